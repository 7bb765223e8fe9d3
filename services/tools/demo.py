"""``pipeserve-demo``: the whole system on this machine, then a load test and a report.

Starts an embedded Redis (or uses ``REDIS_URL``), the controller (planning with the CVXPY
planner on the pipeline's profile, or from an operator plan file with ``--plan-file``), one
worker per task (``--workers``), one router per stage (the root one is the
OIP front door), waits until every worker serves, runs the open-loop load generator,
prints its report and shuts everything down.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from services.common.grpc_utils import add_tls_arguments, tls_from_args
from services.tools.cluster import ClusterConfig, LocalCluster
from services.loadgen.report import format_report
from services.loadgen.runner import LoadConfig, default_cer_fn, load_page_set, run_load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-demo",
        description="Run the OCR pipeline end to end on this machine (Redis, controller, workers, "
                    "routers as separate processes), drive it with the load generator, print the "
                    "report, and shut everything down. Needs `make models data` first.")
    p.add_argument("--spec", default="pipelines/ocr.yaml", help="pipeline spec")
    p.add_argument("--profile", default="profiles/ocr_cpu.json",
                   help="variant profile the controller's planner uses (default: this machine's OCR profile)")
    p.add_argument("--headroom", type=float, default=2.0,
                   help="the planner plans for this multiple of the estimated demand (default 2.0, "
                        "the controller's default)")
    p.add_argument("--cold-start", action="store_true",
                   help="do not tell the planner the expected rate: it starts from zero demand and "
                        "follows the measured demand (the first seconds then run on a plan for too "
                        "little load)")
    p.add_argument("--plan-file", default=None,
                   help="use this operator plan file instead of the planner (e.g. plans/ocr-demo.yaml)")
    p.add_argument("--models", default="models", help="model directory (make models)")
    p.add_argument("--pages", default="data/eval", help="evaluation pages (make data)")
    p.add_argument("--workers", action="append", default=[], metavar="TASK=N",
                   help="workers per task (default 1 each), e.g. --workers rec=2")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--log-dir", default=None, help="where service logs go (default runs/demo-<time>)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tls_arguments(p)   # every service, and the load generator as their client, use them
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    tls = tls_from_args(a, parser)
    for path, hint in ((Path(a.models), "make models"), (Path(a.pages), "make data")):
        if not path.exists():
            print(f"error: {path} does not exist; run `{hint}` first", file=sys.stderr)
            return 2
    workers = {}
    for item in a.workers:
        task, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            print(f"error: --workers expects TASK=N with N >= 1, got {item!r}", file=sys.stderr)
            return 2
        workers[task] = int(n)
    log_dir = Path(a.log_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    # The operator's prior: the controller plans for the announced rate from the start
    # (--cold-start: from zero, so the first seconds show the planner catching up).
    source = ({"plan_file": Path(a.plan_file)} if a.plan_file
              else {"profile": Path(a.profile), "headroom": a.headroom,
                    "min_demand_qps": None if a.cold_start else a.rate * a.headroom})
    cfg = ClusterConfig(spec=Path(a.spec), **source, models=Path(a.models),
                        workers=workers, log_dir=log_dir, tls=tls)
    cluster = LocalCluster(cfg)
    t0 = time.monotonic()
    print(f"plans from: {a.plan_file or 'the planner on ' + a.profile}", flush=True)
    print(f"starting redis, controller, {sum(workers.get(t.name, 1) for t in cluster.spec.tasks)} workers "
          f"and {len(cluster.spec.tasks)} routers (logs: {log_dir}) ...", flush=True)
    report = None
    try:
        cluster.start()
        print(f"ready in {time.monotonic() - t0:.1f}s; front door (OIP v2 gRPC) at {cluster.front_door}; "
              f"sending {a.rate:g} req/s for {a.duration:g}s", flush=True)
        pages = load_page_set(a.pages)
        config = LoadConfig(target=cluster.front_door, pipeline=cluster.spec.name, pages_dir=Path(a.pages),
                            rate=a.rate, duration_s=a.duration, seed=a.seed, slo_ms=cluster.spec.slo_ms,
                            progress=not a.quiet and sys.stderr.isatty(), tls=tls)
        report = asyncio.run(run_load(config, pages, cer_fn=default_cer_fn()))
        cluster.check_alive()
    finally:
        codes = cluster.stop()
    if report is None:
        return 1
    print(format_report(report))
    bad = {k: v for k, v in codes.items() if v not in (0, None)}
    print(f"shut down {len(codes)} processes" + (f"; non-zero exits: {bad}" if bad else " cleanly"))
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
