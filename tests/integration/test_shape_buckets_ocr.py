"""Shape buckets on the real OCR models and the 40 evaluation pages (data/eval): how many
distinct input shapes a worker feeds ONNX Runtime, and what the padding does to CER.

Two real worker cores (det, rec; real ONNX Runtime sessions on the CPU, no gRPC), the pages
sent as the routers send them: each page one det request, each page's crops one rec request,
all pages at once so batches form across pages. Every session's ``run`` is recorded
(warm-up included).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from services.common.onnx import BatchPaddedSession, create_session
from services.common.processing import make_processor
from services.common.spec import ShapeBuckets, load_spec
from services.ocr.cer import page_cer
from services.ocr.pages import load_pages
from services.worker.core import ModelHost, Status, WorkerCore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "data" / "eval"
DET, REC = "det_v6small_320", "rec_v6tiny"   # the demo's path
DET_BATCH, REC_BATCH = 4, 8


class ShapeRecorder:
    """A real ONNX Runtime session whose ``run`` notes the shape of the image it is fed, as
    N x C x H x W (a folded model takes uint8 N x H x W x C, and each item's valid size as a
    second, N x 2 input)."""

    def __init__(self, session):
        self._session = session
        self.shapes: list[tuple[int, ...]] = []

    def run(self, outputs, feeds):
        x = next(iter(feeds.values()))
        self.shapes.append(tuple(x.shape) if x.dtype != np.uint8 else tuple(x.shape[i] for i in (0, 3, 1, 2)))
        return self._session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture(scope="module")
def pages():
    if not (EVAL / "ground_truth.json").is_file():
        pytest.fail(f"{EVAL} has no pages: run `make setup` (pipeserve-make-pages) first", pytrace=False)
    return load_pages(EVAL)


def run_pages(models_dir: Path, pages, buckets: bool, padding: bool = False):
    """OCR every page through a det and a rec worker core; returns (det shapes, rec shapes,
    processors, per-page CER)."""
    spec = load_spec(ROOT / "pipelines" / "ocr.yaml")
    recorders, procs = {}, {}

    def variant(name):
        v = spec.variant(name)
        return v if buckets else dataclasses.replace(v, buckets=ShapeBuckets.none())

    def loader_for(core_ref):
        def load(v):
            proc = make_processor(v, models_dir, spec.plugins)
            session, providers = create_session(proc.model_path, prefer_gpu=False)
            recorders[v.task] = ShapeRecorder(session)
            procs[v.task] = proc
            # padding outside the recorder: it notes what ONNX Runtime is fed
            host = ModelHost(v, proc, BatchPaddedSession(recorders[v.task]) if padding else recorders[v.task],
                             providers, padded=padding)
            host.warm_up(core_ref[0].batch_size)     # as ModelHost.load: counted in the load
            return host
        return load

    async def scenario():
        det_ref, rec_ref = [None], [None]
        det = det_ref[0] = WorkerCore("det", spec.task("det"), models_dir, prefer_gpu=False,
                                      loader=loader_for(det_ref))
        rec = rec_ref[0] = WorkerCore("rec", spec.task("rec"), models_dir, prefer_gpu=False,
                                      loader=loader_for(rec_ref))
        det.tasks["det"] = dataclasses.replace(spec.task("det"), variants=(variant(DET),))
        rec.tasks["rec"] = dataclasses.replace(spec.task("rec"), variants=(variant(REC),))
        det.start(), rec.start()
        await det.apply(DET, DET_BATCH, plan_version=1, task="det")
        await rec.apply(REC, REC_BATCH, plan_version=1, task="rec")
        deadline = time.time() + 600     # generous: the test is about shapes, not speed
        det_out = await asyncio.gather(*[det.submit([(f"p{i}", p.png)], deadline) for i, p in enumerate(pages)])
        rec_out = await asyncio.gather(*[
            rec.submit([(f"p{i}-{j}", c) for j, c in enumerate(o[0].result.child_payloads)], deadline)
            for i, o in enumerate(det_out)])
        await det.stop(), await rec.stop()
        return det_out, rec_out

    det_out, rec_out = asyncio.run(scenario())
    cers = []
    for page, (d,), lines in zip(pages, det_out, rec_out):
        assert d.status is Status.OK and all(o.status is Status.OK for o in lines)
        read = [(o.result.regions[0].text, r.points) for o, r in zip(lines, d.result.regions)]
        cers.append(page_cer(read, page.lines))
    return recorders["det"].shapes, recorders["rec"].shapes, procs, float(np.mean(cers))


@pytest.fixture(scope="module")
def with_buckets(models_dir, pages):
    return run_pages(models_dir, pages, buckets=True)


@pytest.fixture(scope="module")
def without_buckets(models_dir, pages):
    return run_pages(models_dir, pages, buckets=False)


def test_a_worker_feeds_onnx_runtime_at_most_buckets_x_batch_sizes_shapes(with_buckets, without_buckets):
    det_shapes, rec_shapes, procs, _ = with_buckets
    det_allowed = {(b, 3, h, w) for h, w in procs["det"].shape_buckets() for b in range(1, DET_BATCH + 1)}
    rec_allowed = {(b, 3, 48, w) for w in procs["rec"].shape_buckets() for b in range(1, REC_BATCH + 1)}
    assert len(det_allowed) == 4 * DET_BATCH and len(rec_allowed) == 4 * REC_BATCH   # 4 buckets each
    assert set(det_shapes) <= det_allowed, sorted(set(det_shapes) - det_allowed)
    assert set(rec_shapes) <= rec_allowed, sorted(set(rec_shapes) - rec_allowed)
    # the same check fails without buckets: each batch is as wide as its widest crop, so the
    # widths are as many as the crops' (the more pages, the more shapes)
    _, rec_off, _, _ = without_buckets
    print(f"\ndistinct input shapes: det {len(set(det_shapes))} (bound {len(det_allowed)}), "
          f"rec {len(set(rec_shapes))} (bound {len(rec_allowed)}) over {len(rec_shapes)} runs; "
          f"rec without buckets {len(set(rec_off))} over {len(rec_off)} runs")
    assert not set(rec_off) <= rec_allowed
    assert len({s[3] for s in rec_off}) > len(procs["rec"].shape_buckets())


def test_padding_to_buckets_does_not_make_cer_worse(with_buckets, without_buckets):
    on, off = with_buckets[3], without_buckets[3]
    print(f"\nmean page CER over the 40 eval pages, {DET}/{REC}: buckets {on:.4f}, off {off:.4f}")
    assert on <= off + 0.005


@pytest.fixture(scope="module")
def with_padding(models_dir, pages):
    return run_pages(models_dir, pages, buckets=True, padding=True)


def test_batch_padding_feeds_power_of_two_batches_and_reads_the_pages_as_well(with_buckets, with_padding):
    det_shapes, rec_shapes, procs, cer = with_padding
    _, rec_unpadded, _, cer_unpadded = with_buckets
    powers = {1, 2, 4, 8}
    assert {s[0] for s in det_shapes} <= powers and {s[0] for s in rec_shapes} <= powers, (
        sorted({s[0] for s in det_shapes}), sorted({s[0] for s in rec_shapes}))
    # the same check fails unpadded: partial batches run at every size
    assert not {s[0] for s in rec_unpadded} <= powers
    rec_allowed = {(b, 3, 48, w) for w in procs["rec"].shape_buckets() for b in powers}
    assert set(rec_shapes) <= rec_allowed
    print(f"\nbatch padding: rec distinct shapes {len(set(rec_shapes))} (bound {len(rec_allowed)}), "
          f"unpadded {len(set(rec_unpadded))}; CER {cer:.4f} padded, {cer_unpadded:.4f} unpadded")
    # the padding rows are copies whose answers are dropped: the pages read as they did
    assert abs(cer - cer_unpadded) <= 0.002
