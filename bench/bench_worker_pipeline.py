"""One worker core on a real OCR detector with a backlog of full batches: pages/s with a
batch's model call overlapping the previous batch's post-processing (the worker's two
inference threads and its model lock, services/worker/batches.py) against one inference
thread (batches one after the other, as before). In-process, no gRPC; rounds alternate.

    .venv/bin/python bench/bench_worker_pipeline.py                   # ~1 minute
    .venv/bin/python bench/bench_worker_pipeline.py --variant det_v6small_480 --batch 2 --rounds 5

Prints, per round and mode, pages/s and the share of the batch time that was the model
call (the most overlap can save is the rest).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.spec import load_spec  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.worker.batches import Status  # noqa: E402
from services.worker.core import WorkerCore  # noqa: E402


async def one_round(core: WorkerCore, pages: list[bytes], n: int) -> tuple[float, float]:
    """(pages/s, model share of batch time) for ``n`` pages queued at once."""
    payloads = [(f"p{i}", pages[i % len(pages)]) for i in range(n)]
    t0 = time.perf_counter()
    outs = await core.submit(payloads, time.time() + 600)
    wall = time.perf_counter() - t0
    bad = [o.status for o in outs if o.status is not Status.OK]
    if bad:
        raise SystemExit(f"{len(bad)} pages failed: {bad[:3]}")
    model = sum(o.phases.model_ms for o in outs[::core.batch_size])
    service = sum(o.service_ms for o in outs[::core.batch_size])
    return n / wall, model / service if service else 0.0


async def main_async(a: argparse.Namespace) -> None:
    spec = load_spec(ROOT / "pipelines" / "ocr.yaml")
    pages = [p.png for p in load_pages(a.data)[: a.pages]]
    core = WorkerCore("bench", spec.task("det"), a.models, prefer_gpu=False, prep_threads=2,
                      plugins=spec.plugins)
    core.start()
    await core.apply(a.variant, a.batch, plan_version=1)
    await one_round(core, pages, a.batch * 4)     # warm: allocations, caches
    pipelined = core.batches.infer_pool
    serial = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-infer")
    results: dict[str, list[float]] = {"overlapped": [], "serial": []}
    for r in range(a.rounds):
        modes = [("overlapped", pipelined), ("serial", serial)]
        for mode, pool in modes if r % 2 == 0 else modes[::-1]:   # neither always goes first
            core.batches.infer_pool = pool
            rate, share = await one_round(core, pages, a.queries)
            results[mode].append(rate)
            print(f"round {r + 1} {mode:10s} {rate:6.2f} pages/s  model {share:5.1%} of batch time", flush=True)
    core.batches.infer_pool = pipelined
    await core.stop()
    serial.shutdown()
    over, ser = (statistics.median(results[m]) for m in ("overlapped", "serial"))
    print(f"{a.variant} batch {a.batch}: median overlapped {over:.2f} pages/s, serial {ser:.2f} pages/s "
          f"({over / ser:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="det_v6tiny_320", help="detector variant (default det_v6tiny_320)")
    p.add_argument("--batch", type=int, default=4, help="planned batch size (default 4)")
    p.add_argument("--queries", type=int, default=48, help="pages queued per round (default 48)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per mode, alternating (default 3)")
    p.add_argument("--pages", type=int, default=12, help="distinct pages cycled through (default 12)")
    p.add_argument("--data", default=str(ROOT / "data" / "eval"), help="pages (default data/eval)")
    p.add_argument("--models", default=str(ROOT / "models"), help="models directory (default models)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
