"""The worker's burst variant on the real OCR detector (real ONNX Runtime, no sockets):
a batch spilled from det_v6small_480 to det_v6tiny_320 is re-prepared at 320 px from the
raw page and reads the page as det_v6tiny_320 itself does."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from services.common.spec import load_spec
from services.worker.core import Status, WorkerCore

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"


def test_a_spilled_batch_is_re_prepared_for_the_burst_detector_and_reads_as_it_does(models_dir, eval_pages):
    _, pages = eval_pages
    spec = load_spec(SPEC)
    task = spec.task("det")

    async def scenario():
        core = WorkerCore("det-burst", task, models_dir, prefer_gpu=False, prep_threads=1,
                          plugins=spec.plugins)
        # the plan says a batch of 2 pages takes 1 s on det_v6small_480: 12 pages due in 5 s
        # are overrun (ceil(12 / 2) * 1 s > 5 s); 4 tiny pages fit in that second
        await core.apply("det_v6small_480", 2, plan_version=1, latency_ms={1: 1000.0, 2: 1000.0})
        core.set_burst("det", "det_v6tiny_320", {1: 60.0, 2: 110.0, 4: 200.0, 8: 1200.0})
        for _ in range(600):
            if core.burst is not None:
                break
            await asyncio.sleep(0.05)
        burst = core.burst
        assert burst is not None, "the burst detector did not load"
        shapes = []
        prepare = burst.processor.prepare

        def counted(payload):
            p = prepare(payload)
            shapes.append(p.bucket)   # (rows, cols) of the input, whichever layout the model takes
            return p

        burst.processor.prepare = counted
        outs = asyncio.ensure_future(core.submit([(f"p{i}", pg.png) for i, pg in enumerate(pages)],
                                                 time.time() + 5.0))
        while core.queue.queued < len(pages) and not outs.done():
            await asyncio.sleep(0.01)
        core.start()
        done = await asyncio.wait_for(outs, 120)
        await core.stop()
        # what det_v6tiny_320 reads on each page by itself
        direct = [burst.processor.run_batch(burst.session, [prepare(pg.png)])[0] for pg in pages]
        return done, shapes, direct, core.counters["spilled"]

    outs, shapes, direct, spilled_batches = asyncio.run(scenario())
    assert len(outs) == len(pages) and len({o.query_id for o in outs}) == len(pages)   # one answer each
    spilled = [o for o in outs if o.variant == "det_v6tiny_320"]
    assert spilled_batches >= 1 and spilled, [(o.variant, o.status) for o in outs]
    assert all(o.status is Status.OK for o in spilled)
    # re-prepared at 320 px: each page into one of det_v6tiny_320's shape buckets (long side 320)
    assert len(shapes) == len(spilled) and set(shapes) <= {(320, 320), (256, 320), (320, 256), (160, 320)}
    for o in spilled:
        want = direct[int(o.query_id[1:])]
        assert len(o.result.regions) == len(want.regions) > 0
        got = np.array([r.points for r in o.result.regions])
        ref = np.array([r.points for r in want.regions])
        assert np.abs(got - ref).max() <= 2.0      # page pixels: batched vs alone, float noise only
        assert len(o.result.child_payloads) == len(o.result.regions)
    rest = [o for o in outs if o.variant != "det_v6tiny_320"]
    assert all(o.variant == "det_v6small_480" for o in rest)
    assert all(o.status in (Status.OK, Status.DROPPED_DEADLINE) for o in rest)
