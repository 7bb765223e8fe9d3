"""Shape buckets on the CPU: CER, CPU time and distinct input shapes with and without them,
and what the warm-up adds to a model's load.

    .venv/bin/python bench/bench_shape_buckets.py                  # ~2 minutes
    .venv/bin/python bench/bench_shape_buckets.py --pairs det_v4_640/rec_v4 --max-batch 8

For each det/rec pair (``--pairs``) and each setting (``off``: every variant's
``buckets: off``, each batch padded to its largest input as before; ``on``: the buckets of
``pipelines/ocr.yaml``), every evaluation page (``data/eval``) goes through the detector
(batch 1) and its crops through the recogniser in batches of ``--rec-batch`` in reading
order (``services.ocr.local.run_ocr_page``, in-process, ONNX Runtime on one thread).
Printed: mean page CER, CPU ms per page (this process), the distinct input shapes each
session was fed.

Then, per variant, the load as a worker does it (``ModelHost.load``: session + warm-up) at
``--max-batch``: ``off`` (one warm-up input run twice), ``on`` (every bucket at batch 1, the
CPU rule) and ``every size`` (every bucket at every batch size 1..max-batch, the GPU rule,
timed here on the CPU): the best of ``--repeats``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.onnx import create_session  # noqa: E402
from services.common.processing import make_processor  # noqa: E402
from services.common.spec import ShapeBuckets, load_spec  # noqa: E402
from services.ocr.cer import page_cer  # noqa: E402
from services.ocr.local import run_ocr_page  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.worker.core import ModelHost  # noqa: E402


class Shapes:
    def __init__(self, session):
        self._session, self.seen = session, set()

    def run(self, outputs, feeds):
        self.seen.update(tuple(x.shape) for x in feeds.values())
        return self._session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


def variant(spec, name: str, on: bool):
    v = spec.variant(name)
    return v if on else dataclasses.replace(v, buckets=ShapeBuckets.none())


def accuracy(spec, models: Path, pages, det: str, rec: str, on: bool, rec_batch: int) -> dict:
    stages = []
    for name in (det, rec):
        proc = make_processor(variant(spec, name, on), models, spec.plugins)
        session, _ = create_session(proc.model_path, prefer_gpu=False)
        stages += [proc, Shapes(session)]
    for page in pages[:2]:   # first runs allocate: not timed
        run_ocr_page(page.png, *stages, rec_batch=rec_batch)
    stages[1].seen.clear(), stages[3].seen.clear()
    cpu0 = time.process_time()
    cers = [page_cer([(t, p) for t, p, _ in run_ocr_page(page.png, *stages, rec_batch=rec_batch)], page.lines)
            for page in pages]
    cpu_ms = (time.process_time() - cpu0) * 1e3 / len(pages)
    return {"cer": float(np.mean(cers)), "cpu_ms": cpu_ms, "det_shapes": len(stages[1].seen),
            "rec_shapes": len(stages[3].seen)}


def load_ms(spec, models: Path, name: str, mode: str, max_batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if mode == "every size":
            proc = make_processor(variant(spec, name, True), models, spec.plugins)
            session, _ = create_session(proc.model_path, prefer_gpu=False)
            # the GPU rule (every batch size) on this CPU session: what it would cost here
            ModelHost(proc.variant, proc, session, ["CUDAExecutionProvider"]).warm_up(max_batch)
        else:
            ModelHost.load(variant(spec, name, mode == "on"), models, False, 1, spec.plugins, max_batch)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "pipelines" / "ocr.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--pages", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--pairs", default="det_v6small_320/rec_v6tiny,det_v6small_480/rec_v6small,det_v4_640/rec_v4")
    ap.add_argument("--rec-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8, help="batch size the loads warm for (default 8)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-load", action="store_true", help="only the accuracy part")
    args = ap.parse_args(argv)
    spec, pages = load_spec(args.spec), load_pages(args.pages)
    pairs = [p.split("/") for p in args.pairs.split(",")]
    print(f"{len(pages)} pages from {args.pages}, rec batches of {args.rec_batch}")
    print(f"{'det/rec':34s} {'buckets':8s} {'CER':>7s} {'CPU ms/page':>12s} {'det shapes':>11s} {'rec shapes':>11s}")
    for det, rec in pairs:
        for on in (False, True):
            r = accuracy(spec, args.models, pages, det, rec, on, args.rec_batch)
            print(f"{det + '/' + rec:34s} {'on' if on else 'off':8s} {r['cer']:7.4f} {r['cpu_ms']:12.1f} "
                  f"{r['det_shapes']:11d} {r['rec_shapes']:11d}", flush=True)
    if args.skip_load:
        return 0
    print(f"\nload (session + warm-up) at batch size {args.max_batch}, best of {args.repeats}, ms:")
    print(f"{'variant':20s} {'off':>8s} {'on':>8s} {'every size':>11s}")
    for name in dict.fromkeys(n for pair in pairs for n in pair):
        ms = [load_ms(spec, args.models, name, mode, args.max_batch, args.repeats)
              for mode in ("off", "on", "every size")]
        print(f"{name:20s} {ms[0]:8.0f} {ms[1]:8.0f} {ms[2]:11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
