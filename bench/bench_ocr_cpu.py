"""CPU milliseconds per page for each stage of the OCR work around and in the models.

    .venv/bin/python bench/bench_ocr_cpu.py                          # ~1 minute
    .venv/bin/python bench/bench_ocr_cpu.py --det det_v6small_480 --rec rec_v6small --buckets off

Every page of ``data/eval`` goes through the same functions the processors use, one stage at
a time, each timed by this process's CPU clock (``time.process_time``; ONNX Runtime runs on
one intra-op thread, in the calling thread, as in the workers): page decode, det
resize + normalise + pad, det model, DB boxes (probability map to boxes), crop warp, crop
JPEG encode (what the det worker sends), crop decode (at the rec worker), rec resize +
normalise + pad, rec model (batches of ``--rec-batch`` per page, within a bucket), CTC
decode. Printed: the mean CPU ms per page of each stage and its share; the models' share is
what a GPU would take over, the rest is what stays on the host's cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.onnx import create_session  # noqa: E402
from services.common.processing import make_processor, split_by_bucket  # noqa: E402
from services.common.spec import ShapeBuckets, load_spec  # noqa: E402
from services.ocr.ctc import ctc_greedy_decode, softmax  # noqa: E402
from services.ocr.geometry import crop_quad, db_boxes, reading_order  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.ocr.processors import _feeds, decode_image, encode_image  # noqa: E402

STAGES = ("page decode", "det preprocess", "det model", "DB boxes", "crop warp", "crop encode",
          "crop decode", "rec preprocess", "rec model", "CTC decode")
MODEL_STAGES = ("det model", "rec model")


class Clock:
    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        self.ms[stage] += (time.process_time() - t0) * 1e3
        return out


def one_page(png: bytes, det, det_sess, rec, rec_sess, rec_batch: int, clock: Clock) -> int:
    image = clock("page decode", decode_image, png, det.max_side)
    prep = clock("det preprocess", det.prepare_image, image)
    outputs, feeds = _feeds(det.variant, det_sess, prep.data[None])
    prob = clock("det model", lambda: det_sess.run(outputs, feeds)[0])
    prob = prob[0].reshape(prob.shape[-2:])
    rh, rw = prep.meta["valid"]
    found = clock("DB boxes", db_boxes, prob[:rh, :rw], det.db)
    h, w = image.shape[:2]
    boxes = []
    for box, _ in found:
        box = box / prep.meta["scale"]
        box[:, 0] = np.clip(box[:, 0], 0, w)
        box[:, 1] = np.clip(box[:, 1], 0, h)
        boxes.append(box)
    crops = [clock("crop warp", crop_quad, image, boxes[i]) for i in reading_order(boxes)]
    payloads = [clock("crop encode", encode_image, c, det.crop_format, det.crop_quality) for c in crops]
    items = [clock("rec preprocess", rec.prepare_image, clock("crop decode", decode_image, p, rec.max_side))
             for p in payloads]
    for start in range(0, len(items), rec_batch):
        chunk = items[start:start + rec_batch]
        for idx in split_by_bucket(chunk):
            group = [chunk[i] for i in idx]
            width = max(it.data.shape[2] for it in group)
            batch = np.full((len(group), 3, rec.height, width), rec.pad_value, np.float32)
            for i, it in enumerate(group):
                batch[i, :, :, :it.data.shape[2]] = it.data
            outputs, feeds = _feeds(rec.variant, rec_sess, batch)
            probs = clock("rec model", lambda: rec_sess.run(outputs, feeds)[0])

            def decode(probs=probs):
                p = softmax(probs) if probs.min() < 0 or probs.max() > 1.0 + 1e-3 else probs
                return [ctc_greedy_decode(row, rec.charset) for row in p]
            clock("CTC decode", decode)
    return len(items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "pipelines" / "ocr.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--pages", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--det", default="det_v6small_320")
    ap.add_argument("--rec", default="rec_v6tiny")
    ap.add_argument("--rec-batch", type=int, default=8)
    ap.add_argument("--buckets", choices=("on", "off"), default="on",
                    help="the spec's shape buckets, or every variant's buckets: off")
    args = ap.parse_args(argv)
    spec, pages = load_spec(args.spec), load_pages(args.pages)
    procs = []
    for name in (args.det, args.rec):
        v = spec.variant(name)
        if args.buckets == "off":
            v = dataclasses.replace(v, buckets=ShapeBuckets.none())
        proc = make_processor(v, args.models, spec.plugins)
        session, providers = create_session(proc.model_path, prefer_gpu=False, intra_op_threads=1)
        procs += [proc, session]
    warm = Clock()
    for page in pages[:2]:                     # first runs allocate: not counted
        one_page(page.png, *procs, args.rec_batch, warm)
    clock = Clock()
    lines = sum(one_page(page.png, *procs, args.rec_batch, clock) for page in pages)
    total = sum(clock.ms.values())
    n = len(pages)
    print(f"{n} pages ({lines} lines), {args.det} + {args.rec}, buckets {args.buckets}, rec batches of "
          f"{args.rec_batch}, providers {procs[1].get_providers()[0]}: CPU ms per page")
    for stage in STAGES:
        print(f"  {stage:16s} {clock.ms[stage] / n:8.2f}  {100 * clock.ms[stage] / total:5.1f} %")
    model = sum(clock.ms[s] for s in MODEL_STAGES)
    print(f"  {'total':16s} {total / n:8.2f}; models {model / n:.2f} ({100 * model / total:.1f} %), "
          f"the rest {(total - model) / n:.2f} ({100 * (total - model) / total:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
