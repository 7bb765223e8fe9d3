"""``pipeserve-demo``: the whole system on this machine, then a load test and a report.

First fits the profile to this host (``pipeserve-calibrate``: a short speed probe, cached
per host) and picks the rate from the capacity it implies, unless ``--rate`` is given. Then
starts an embedded Redis (or uses ``REDIS_URL``), the controller (planning with the CVXPY
planner on that profile, or from an operator plan file with ``--plan-file``), one worker per
task (``--workers``), one router per stage (the root one is the OIP front door), waits until
every worker of the plan serves, runs the open-loop load generator, prints its report (with
the final plan and the latency factors the controller measured) and shuts everything down.
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
from services.common.spec import load_spec
from services.loadgen.report import format_report
from services.tools.calibrate import add_calibration_arguments, profile_to_plan_on
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
    p.add_argument("--rate", type=float, default=None,
                   help="requests per second (Poisson); default: from this host's measured capacity "
                        "(1.3x what it carries at full accuracy, so accuracy scaling shows, and at "
                        "most half of what it carries with accuracy scaling)")
    add_calibration_arguments(p)
    p.add_argument("--profile-error", type=float, default=1.0,
                   help="hand the controller the profile with every latency times this (0.5: a "
                        "profile 2x too optimistic), to watch its online calibration correct it")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--log-dir", default=None, help="where service logs go (default runs/demo-<time>)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tls_arguments(p)   # every service, and the load generator as their client, use them
    return p


def host_capacity(profile_path: Path, workers: dict[str, int], slo_ms: float) -> tuple[float, float]:
    """(full-accuracy, accuracy-scaled) capacity in requests/s of these task-bound workers
    on this profile, as the planner computes it (p95 latencies, SLO / 2 per path)."""
    from services.planner import load_profile
    from services.planner.capacity import max_demand

    profile = load_profile(profile_path)
    n = sum(workers.values())
    full = max_demand(profile, n, slo_ms, full_accuracy=True, method="relaxed", task_workers=workers)
    scaled = max_demand(profile, n, slo_ms, method="relaxed", task_workers=workers)
    return full.served_qps, scaled.served_qps


def final_plan(cluster: LocalCluster) -> dict | None:
    from services.gen import pipeserve_pb2 as pb
    from services.gen import pipeserve_pb2_grpc as pb_grpc

    try:
        with cluster.channel(cluster.controller_address) as ch:
            return json.loads(pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5).plan_json)
    except Exception:   # the report goes on without it
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    tls = tls_from_args(a, parser)
    for path, hint in ((Path(a.models), "make models"), (Path(a.pages), "make data")):
        if not path.exists():
            print(f"error: {path} does not exist; run `{hint}` first", file=sys.stderr)
            return 2
    if a.profile_error <= 0:
        parser.error("--profile-error must be positive")
    spec = load_spec(a.spec)
    workers = {t.name: 1 for t in spec.tasks}
    for item in a.workers:
        task, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1 or task not in workers:
            print(f"error: --workers expects TASK=N with a task of {list(workers)} and N >= 1, got {item!r}",
                  file=sys.stderr)
            return 2
        workers[task] = int(n)
    log_dir = Path(a.log_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    rate = a.rate
    source: dict = {"plan_file": Path(a.plan_file)} if a.plan_file else {}
    if not a.plan_file:
        # 1. the profile that fits this host: a short probe, cached per host
        profile = profile_to_plan_on(Path(a.spec), Path(a.profile), Path(a.models), Path(a.pages), a.calibrate,
                                     Path(a.calibration_cache))
        full, scaled = host_capacity(profile, workers, spec.slo_ms)
        print(f"capacity on this host ({' + '.join(f'{n} {t}' for t, n in workers.items())} workers, "
              f"by the profile): {full:.1f} req/s at full accuracy, {scaled:.1f} req/s with accuracy scaling",
              flush=True)
        if rate is None:
            rate = round(max(0.5, min(1.3 * full, 0.5 * scaled)), 1)
        # 2. optionally a wrong profile for the controller, to show it correcting itself
        if a.profile_error != 1.0:
            from services.planner import load_profile, write_profile
            from services.policy.calibration import scale_profile

            base = load_profile(profile)
            wrong = scale_profile(base, {(t.name, v.name): a.profile_error for t in base.tasks
                                         for v in t.variants}, note=f"x{a.profile_error:g} (--profile-error)")
            profile = log_dir / "profile-with-error.json"
            write_profile(wrong, profile)
            print(f"the controller gets a profile with every latency x{a.profile_error:g} ({profile})", flush=True)
        # The operator's prior: the controller plans for the announced rate from the start
        # (--cold-start: from zero, so the first seconds show the planner catching up).
        source = {"profile": profile, "headroom": a.headroom,
                  "min_demand_qps": None if a.cold_start else rate * a.headroom}
    if rate is None:
        rate = 5.0
    cfg = ClusterConfig(spec=Path(a.spec), **source, models=Path(a.models),
                        workers=workers, log_dir=log_dir, tls=tls)
    cluster = LocalCluster(cfg)
    t0 = time.monotonic()
    print(f"plans from: {a.plan_file or 'the planner on ' + str(source['profile'])}", flush=True)
    print(f"starting redis, controller, {sum(workers.values())} workers "
          f"and {len(cluster.spec.tasks)} routers (logs: {log_dir}) ...", flush=True)
    report = plan = None
    try:
        cluster.start()
        print(f"ready in {time.monotonic() - t0:.1f}s; front door (OIP v2 gRPC) at {cluster.front_door}; "
              f"sending {rate:g} req/s for {a.duration:g}s", flush=True)
        pages = load_page_set(a.pages)
        config = LoadConfig(target=cluster.front_door, pipeline=cluster.spec.name, pages_dir=Path(a.pages),
                            rate=rate, duration_s=a.duration, seed=a.seed, slo_ms=cluster.spec.slo_ms,
                            progress=not a.quiet and sys.stderr.isatty(), tls=tls)
        report = asyncio.run(run_load(config, pages, cer_fn=default_cer_fn()))
        cluster.check_alive()
        plan = final_plan(cluster)
    finally:
        codes = cluster.stop()
    if report is None:
        return 1
    print(format_report(report))
    settled = [r for r in report.results if r.t_s is not None and r.t_s >= SETTLE_S]
    if settled and a.duration > 2 * SETTLE_S:
        bad = sum(not r.on_time for r in settled)
        print(f"after the first {SETTLE_S:g} s           {bad}/{len(settled)} = {bad / len(settled):.4f} SLO violations")
    if plan is not None:
        cal = plan.get("calibration") or {}
        used = {f"{w['task']}/{w['variant']}" for w in plan["workers"].values()}
        shown = ", ".join(f"{k} x{v:.2f}" for k, v in sorted(cal.items()) if k in used)
        print(f"final plan v{plan['version']} ({plan['source']}): capacity {plan.get('capacity_qps') or 0:.1f} "
              f"req/s, expected accuracy {plan.get('expected_accuracy') or 0:.4f}"
              + (f"; measured / profile latency: {shown}" if shown else ""))
    bad_exits = {k: v for k, v in codes.items() if v not in (0, None)}
    print(f"shut down {len(codes)} processes" + (f"; non-zero exits: {bad_exits}" if bad_exits else " cleanly"))
    if a.json:
        out = report.to_dict()
        out["final_plan"] = plan
        Path(a.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


SETTLE_S = 10.0


if __name__ == "__main__":
    raise SystemExit(main())
