"""Measure every OCR variant on generated pages: latency (one ORT thread) and end-to-end CER.

    python -m services.ocr.bench --pages data/eval --count 40

Detectors are measured with the reference recogniser (``--rec``), recognisers behind the
reference detector (``--det``); prints markdown tables (the numbers in docs/ocr.md).
Single-item batches throughout, after one warm-up call per session.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import load_spec
from services.ocr.cer import page_cer
from services.ocr.pages import load_pages


@dataclass
class TimedSession:
    """Wraps an ONNX Runtime session and accumulates the time spent in ``run``."""

    session: Any
    seconds: float = 0.0
    calls: int = 0

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self.session, name)


@dataclass
class Stage:
    proc: Any
    sess: TimedSession
    total_s: float = 0.0
    items: int = 0
    extra: dict = field(default_factory=dict)

    def __call__(self, payload: bytes):
        t = time.perf_counter()
        out = self.proc.run_batch(self.sess, [self.proc.prepare(payload)])[0]
        self.total_s += time.perf_counter() - t
        self.items += 1
        return out


def load_stage(spec, name: str, models: Path, threads: int) -> Stage:
    proc = make_processor(spec.variant(name), models, spec.plugins)
    session, _ = create_session(proc.model_path, prefer_gpu=False, intra_op_threads=threads)
    return Stage(proc, TimedSession(session))


def detection_cer(detected, texts: list[str], page) -> float:
    """Page CER of one detector result (``ItemResult``) read by a recogniser as ``texts``
    (one per region, in order). Shared with the profiler (services/tools/profiler.py)."""
    if len(texts) != len(detected.regions):
        raise ValueError(f"{len(texts)} texts for {len(detected.regions)} regions")
    return page_cer([(t, r.points) for t, r in zip(texts, detected.regions)], page.lines)


def recognise(proc, session, crops, batch: int = 16) -> list[str]:
    """Texts of encoded crops, run in batches of ``batch`` (as ``local.run_ocr_page`` does)."""
    prepared = [proc.prepare(c) for c in crops]
    out: list[str] = []
    for start in range(0, len(prepared), batch):
        out += [r.regions[0].text for r in proc.run_batch(session, prepared[start:start + batch])]
    return out


def evaluate(det: Stage, rec: Stage, pages) -> tuple[float, float]:
    """Mean page CER and mean boxes per page; accumulates stage timings."""
    cers, boxes = [], []
    for page in pages:
        d = det(page.png)
        texts = [rec(c).regions[0].text for c in d.child_payloads]
        cers.append(detection_cer(d, texts, page))
        boxes.append(len(d.regions))
    return float(np.mean(cers)), float(np.mean(boxes))


def warm(stage: Stage, payload: bytes) -> None:
    stage(payload)
    stage.total_s, stage.items, stage.sess.seconds, stage.sess.calls = 0.0, 0, 0.0, 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.ocr.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--pages", type=Path, default=Path("data/eval"))
    ap.add_argument("--count", type=int, default=40, help="pages to use (default: %(default)s)")
    ap.add_argument("--rec-pages", type=int, default=20, help="pages for the recogniser table")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default: %(default)s)")
    ap.add_argument("--det", default="det_v6small_640", help="reference detector")
    ap.add_argument("--rec", default="rec_v6tiny", help="reference recogniser")
    ap.add_argument("--only", nargs="*", help="variants to measure (default: all)")
    args = ap.parse_args(argv)

    spec = load_spec(args.spec)
    pages = load_pages(args.pages)[: args.count]
    truth_lines = np.mean([len(p.lines) for p in pages])
    print(f"{len(pages)} pages, {truth_lines:.2f} truth lines per page, ORT threads={args.threads}\n")
    pick = lambda names: [n for n in names if not args.only or n in args.only]  # noqa: E731

    ref_rec = load_stage(spec, args.rec, args.models, args.threads)
    print(f"| detector | det ms/page (model) | det ms/page (total) | boxes/page | CER with {args.rec} |")
    print("|---|---|---|---|---|")
    for v in pick([v.name for v in spec.task("det").variants]):
        det = load_stage(spec, v, args.models, args.threads)
        warm(det, pages[0].png)
        cer, boxes = evaluate(det, ref_rec, pages)
        print(f"| {v} | {1e3 * det.sess.seconds / det.items:.1f} | {1e3 * det.total_s / det.items:.1f} "
              f"| {boxes:.2f} | {cer:.4f} |", flush=True)

    ref_det = load_stage(spec, args.det, args.models, args.threads)
    sub = pages[: args.rec_pages]
    print(f"\n| recogniser | ms/crop (model) | ms/crop (total) | CER behind {args.det} ({len(sub)} pages) |")
    print("|---|---|---|---|")
    for v in pick([v.name for v in spec.task("rec").variants]):
        rec = load_stage(spec, v, args.models, args.threads)
        warm(rec, ref_det(sub[0].png).child_payloads[0])
        cer, _ = evaluate(ref_det, rec, sub)
        print(f"| {v} | {1e3 * rec.sess.seconds / rec.items:.2f} | {1e3 * rec.total_s / rec.items:.2f} "
              f"| {cer:.4f} |", flush=True)

    print("\n| crop encoding | mean bytes/crop | CER (det_v6small_480 + rec_v6tiny) |")
    print("|---|---|---|")
    for fmt in ("png", "jpeg", "raw"):
        det = load_stage(spec, "det_v6small_480", args.models, args.threads)
        det.proc.crop_format = fmt
        sizes = [len(c) for p in sub for c in det(p.png).child_payloads]
        cer, _ = evaluate(det, ref_rec, sub)
        q = f" q{det.proc.crop_quality}" if fmt == "jpeg" else ""
        print(f"| {fmt}{q} | {np.mean(sizes):.0f} | {cer:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
