"""Run Triton's perf_analyzer against a front door (``python -m services.tools.perf_analyzer``).

    # a running front door
    python -m services.tools.perf_analyzer --target 127.0.0.1:8001 --model ocr \\
        --images data/eval --count 8 -- --concurrency-range 1:4:3
    # or a local cluster of the pipeline on an operator plan, started and stopped around it
    python -m services.tools.perf_analyzer --spec pipelines/ocr.yaml --plan-file plans/ocr-demo.yaml \\
        --images data/eval -- --concurrency-range 1:4:3

perf_analyzer is the C++ load tester shipped as a binary in the ``tritonclient`` 2.51.0
wheel (later wheels leave it out). ``make perf-tools`` installs it into its own virtual
environment, ``.venv-perf`` (the ``perf`` extra of pyproject.toml: that tritonclient pins
numpy < 2 and protobuf < 5, which the project's environment is past), with the CUDA
runtime it links (``nvidia-cuda-runtime-cu12``; no GPU needed) and Debian's ``libb64-0d``.

This module finds the binary (``$PERF_ANALYZER``, else ``.venv-perf/bin/perf_analyzer``),
gives it ``LD_LIBRARY_PATH`` with the wheel's CUDA runtime, and writes its input data: the
front door's input ``image`` is BYTES, which perf_analyzer's JSON input format takes as
``{"b64": ...}`` of the serialized tensor (a 4-byte little-endian length, then the encoded
image). Every argument after ``--`` goes to perf_analyzer unchanged.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
PERF_VENV = ROOT / ".venv-perf"
ENV_VAR = "PERF_ANALYZER"
IMAGE_INPUT = "image"   # oip.IMAGE_INPUT (not imported here: `make perf-tools` runs this module
                        # before the gRPC code is generated)


class PerfAnalyzerMissing(RuntimeError):
    """perf_analyzer is not installed (or cannot load its libraries); the message says how
    to install it."""


@dataclass(frozen=True)
class PerfAnalyzer:
    path: Path
    env: dict[str, str]   # the environment to run it in (LD_LIBRARY_PATH with the CUDA runtime)

    def command(self, target: str, model: str, input_data: Path, args: Sequence[str] = ()) -> list[str]:
        return [str(self.path), "-m", model, "-u", target, "-i", "grpc",
                "--input-data", str(input_data), *args]

    def run(self, target: str, model: str, input_data: Path, args: Sequence[str] = (), *,
            timeout_s: float | None = None, capture: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(target, model, input_data, args), env=self.env,
                              capture_output=capture, text=True, timeout=timeout_s, check=False)


def cuda_runtime_lib_dirs(venv: Path) -> list[Path]:
    """The ``nvidia-cuda-runtime-cu12`` wheel's library folder(s) inside ``venv``."""
    return sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))


def find_perf_analyzer(venv: Path = PERF_VENV, *, check: bool = True) -> PerfAnalyzer:
    """The perf_analyzer binary and its environment. ``check`` runs ``--version`` once, so
    a missing shared library (libb64, the CUDA runtime) is reported here, clearly."""
    given = os.environ.get(ENV_VAR)
    path = Path(given) if given else venv / "bin" / "perf_analyzer"
    if not path.is_file():
        where = f"${ENV_VAR}={given}" if given else str(path)
        raise PerfAnalyzerMissing(
            f"perf_analyzer not found at {where}: run `make perf-tools` (installs the tritonclient "
            f"2.51.0 wheel's binary into {venv.name}, its CUDA runtime and libb64-0d), or set "
            f"${ENV_VAR} to the binary")
    env = dict(os.environ)
    libs = [str(d) for d in cuda_runtime_lib_dirs(venv)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    found = PerfAnalyzer(path, env)
    if check:
        try:
            out = subprocess.run([str(path), "--version"], env=env, capture_output=True, text=True,
                                 timeout=60)
        except OSError as exc:
            raise PerfAnalyzerMissing(f"cannot run {path}: {exc}") from None
        if out.returncode != 0 or "Perf Analyzer Version" not in out.stdout + out.stderr:
            raise PerfAnalyzerMissing(
                f"{path} --version failed (exit {out.returncode}): "
                f"{(out.stderr or out.stdout).strip()[-500:]}\n`make perf-tools` installs what it "
                "links (libb64-0d with apt-get, the CUDA runtime wheel)")
    return found


def input_data(images: Sequence[bytes], input_name: str = IMAGE_INPUT) -> dict:
    """perf_analyzer's JSON input data: one step per image, each the BYTES tensor of shape
    [1] holding it, serialized (length prefix + bytes) and base64-encoded."""
    from services.common import oip

    if not images:
        raise ValueError("input_data needs at least one image")
    return {"data": [{input_name: {"b64": base64.b64encode(oip.encode_bytes_tensor([image])).decode()}}
                     for image in images]}


def write_input_data(path: Path, images: Sequence[bytes], input_name: str = IMAGE_INPUT) -> Path:
    path.write_text(json.dumps(input_data(images, input_name)))
    return path


def read_csv_report(path: Path) -> list[dict[str, float]]:
    """The rows of perf_analyzer's ``-f`` CSV report (one per concurrency or rate), numbers
    as floats: "Concurrency", "Inferences/Second", "p50 latency" (us), ... ."""
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if k and v not in (None, "")}
                for row in csv.DictReader(f)]


def _images(paths: Sequence[Path], count: int) -> list[bytes]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg")))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: {p} is neither an image file nor a folder")
    if not files:
        raise SystemExit("error: no PNG/JPEG images in " + ", ".join(map(str, paths)))
    return [f.read_bytes() for f in files[:count]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="python -m services.tools.perf_analyzer",
        description="Run Triton's perf_analyzer (make perf-tools) against a pipeserve front door "
                    "with real images as input data; arguments after -- go to perf_analyzer.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="front door address HOST:PORT")
    where.add_argument("--spec", type=Path,
                       help="start a local cluster of this pipeline (with --plan-file) and stop it after")
    p.add_argument("--plan-file", type=Path, help="with --spec: the operator plan (e.g. plans/ocr-demo.yaml)")
    p.add_argument("--models", type=Path, default=Path("models"), help="with --spec: model folder")
    p.add_argument("--model", help="the pipeline's name (e.g. ocr, echo; default with --spec: its name)")
    p.add_argument("--images", type=Path, nargs="+", required=True,
                   help="PNG/JPEG files or folders of them (e.g. data/eval)")
    p.add_argument("--count", type=int, default=8, help="use at most this many images (default 8)")
    p.add_argument("--keep-input", type=Path, default=None,
                   help="write the input-data JSON here (default: a temporary file)")
    a = p.parse_args(argv)
    if a.spec is not None and a.plan_file is None:
        p.error("--spec needs --plan-file")
    if a.target is not None and a.model is None:
        p.error("--target needs --model")
    try:
        pa = find_perf_analyzer()
    except PerfAnalyzerMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images = _images(a.images, a.count)
    with tempfile.TemporaryDirectory(prefix="perf-input-") as tmp:
        path = write_input_data(a.keep_input or Path(tmp) / "input.json", images)
        if a.target is not None:
            return _run(pa, a.target, a.model, path, extra)
        from services.tools.cluster import ClusterConfig, LocalCluster

        log_dir = Path("runs") / f"perf-{time.strftime('%Y%m%d-%H%M%S')}"
        cluster = LocalCluster(ClusterConfig(spec=a.spec, plan_file=a.plan_file, models=a.models,
                                             log_dir=log_dir))
        print(f"starting a local cluster of {a.spec} on {a.plan_file} (logs: {log_dir}) ...", flush=True)
        with cluster:
            return _run(pa, cluster.front_door, a.model or cluster.spec.name, path, extra)


def _run(pa: PerfAnalyzer, target: str, model: str, path: Path, extra: Sequence[str]) -> int:
    print("$ " + " ".join(pa.command(target, model, path, extra)), flush=True)
    return pa.run(target, model, path, extra, capture=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
