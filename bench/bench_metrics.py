"""What the metrics hooks cost the data path (services/common/metrics.py), per call, in
this process: the front door's latency observation (once per request), a stage router's
outcome count and two latency observations (once per request per stage), a worker's
batch observation (once per batch), and one scrape of the registry with a two-stage
cluster's worth of series.

    .venv/bin/python bench/bench_metrics.py

Prints the median of 5 repetitions of each (microseconds per call; the scrape in ms).
"""
from __future__ import annotations

import statistics
import sys
import timeit
from enum import Enum
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import REGISTRY, generate_latest  # noqa: E402

from services.common.metrics import FrontDoorMetrics, RouterMetrics, WorkerMetrics  # noqa: E402
from services.gen import pipeserve_pb2 as pb  # noqa: E402
from services.router.stats import breakdown, critical_path  # noqa: E402


class Obj(SimpleNamespace):
    pass


class State(str, Enum):
    SERVING = "serving"
    PARKED = "parked"


def per_call_us(fn, number: int = 100_000) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    fd = Obj(spec=SimpleNamespace(name="bench"), counts={"ok": 0}, inflight_bytes=0, admission=None)
    front = FrontDoorMetrics(fd)
    routers = [RouterMetrics(Obj(plan=None), t, {1: "ok", 2: "dropped_deadline"}) for t in ("a", "b")]
    results = [SimpleNamespace(status=1)]
    cores = [Obj(worker_id=f"bench-{t}", counters={"completed": 0}, queue=SimpleNamespace(queued=0),
                 plan_version=1, state=State.SERVING, host=None, task=None, batch_size=8) for t in ("a", "b")]
    workers = [WorkerMetrics(c) for c in cores]
    for w in workers:
        w.model_loaded("v", 0.1)
    r = routers[0]
    # an OCR page's result tree: a detector query with 20 recognised lines
    page = pb.QueryResult(queue_ms=1, preprocess_ms=5, model_ms=30, postprocess_ms=5, crop_encode_ms=1,
                          worker_ms=43, call_ms=45, children_ms=60)
    for i in range(20):
        page.children.add(queue_ms=1, preprocess_ms=2, model_ms=30 + i % 3, worker_ms=35, call_ms=38 + i % 5)

    def phases() -> None:
        t = breakdown(critical_path(page), 110.0, 108.0, 0.1, 0.2, stages=False)
        front.phases(t["phases_ms"], t["unaccounted_ms"])

    rows = [
        ("front door: answered (per request)", per_call_us(lambda: front.answered(0.05))),
        ("front door: latency breakdown + 11 phase observations (per request)",
         per_call_us(phases, number=20_000)),
        ("front door: the same with the per-stage detail (timing requested)",
         per_call_us(lambda: breakdown(critical_path(page), 110.0, 108.0, 0.1, 0.2), number=20_000)),
        ("router: stage_done + route_done (per request and stage)",
         per_call_us(lambda: (r.stage_done(results, 0.01), r.route_done(0.02)))),
        ("worker: batch (per batch)", per_call_us(lambda: workers[0].batch("v", 4, 0.01))),
    ]
    for name, us in rows:
        print(f"{name:58s} {us:6.2f} us")
    scrape_ms = per_call_us(lambda: generate_latest(REGISTRY), number=200) / 1000
    lines = generate_latest(REGISTRY).decode().count("\n")
    print(f"{f'one scrape of this registry ({lines} lines)':58s} {scrape_ms:6.2f} ms")


if __name__ == "__main__":
    main()
