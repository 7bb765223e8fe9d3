"""Steps on real processes: a square wave between 0.3x and 2x of what the pool carries at
full accuracy with the planner's headroom (its full-accuracy capacity / ``--headroom``: the
demand up to which the planner keeps every worker on the most accurate variants), on a local cluster (embedded Redis, controller with the planner on the
host-calibrated profile, one router per stage, ``--pool`` pool workers), and what it cost:

* violations (not OK within the SLO, from the scheduled send time) overall and in the
  first ``--after-s`` seconds after each step (up and down);
* plan versions seen during the run (the loadgen's plan history, sampled every 0.5 s);
* active (planned) and parked workers, the controller's demand estimate and the plan's
  capacity over time;
* the variant paths of the OK answers (a burst variant shows as a path the plan did not
  name for that stage).

    .venv/bin/python bench/bench_steps.py                     # about 2.5 minutes
    .venv/bin/python bench/bench_steps.py --low 0.3 --high 2 --period 30 --duration 90

Each run writes its records, plan history and the services' logs to ``--log-dir``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="pipelines/ocr.yaml")
    p.add_argument("--profile", default="profiles/ocr_cpu.json", help="profile to calibrate to this host")
    p.add_argument("--calibration-cache", default="runs/profiles")
    p.add_argument("--models", default="models")
    p.add_argument("--pages", default="data/eval")
    p.add_argument("--pool", type=int, default=3)
    p.add_argument("--headroom", type=float, default=2.0,
                   help="the controller's --headroom: the base rate is the full-accuracy capacity / this")
    p.add_argument("--base-qps", type=float, default=None, help="the base rate (default: as above)")
    p.add_argument("--low", type=float, default=0.3, help="low rate, x the base rate")
    p.add_argument("--high", type=float, default=2.0, help="high rate, x the base rate")
    p.add_argument("--period", type=float, default=30.0, help="square wave period (s)")
    p.add_argument("--duration", type=float, default=90.0)
    p.add_argument("--after-s", type=float, default=3.0, help="window after each step (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--controller-arg", action="append", default=[], help="extra controller flag (repeat)")
    p.add_argument("--log-dir", default="runs/bench_steps")
    p.add_argument("--json", default=None, help="write the summary here as JSON")
    return p


def violated(r: dict) -> bool:
    return not (r["ok"] and r["on_time"])


def summarise(records: list[dict], history: list[dict], period: float, duration: float, after_s: float,
              low: float, high: float) -> dict:
    n = len(records)
    bad = sum(violated(r) for r in records)
    half = period / 2.0
    steps = [k * half for k in range(1, int(duration / half) + 1) if k * half < duration]
    per_step = []
    for s in steps:
        up = round(s / half) % 2 == 1          # low for the first half period, high for the second
        sel = [r for r in records if s <= r["scheduled_s"] < s + after_s]
        per_step.append({"t_s": s, "to": high if up else low, "requests": len(sel),
                         "violations": sum(violated(r) for r in sel)})
    in_after = sum(x["requests"] for x in per_step)
    bad_after = sum(x["violations"] for x in per_step)
    samples = [h for h in history if "error" not in h]
    versions = sorted({h["version"] for h in samples if h.get("version") is not None})
    timeline = []
    for h in samples:
        timeline.append({"t_s": h["t_s"], "version": h.get("version"), "active": h.get("active_workers"),
                         "parked": h.get("parked"), "demand_qps": h.get("demand_qps"),
                         "capacity_qps": h.get("capacity_qps"), "workers": h.get("workers")})
    paths = Counter(r.get("variant_path") for r in records if r["ok"])
    # an answer that went through a variant its plan version does not run: a burst variant
    planned = {h["version"]: {k.split("/", 1)[1] for k in (h.get("workers") or {})} for h in samples
               if h.get("version") is not None}
    burst = [r for r in records if r["ok"] and r.get("variant_path") and r.get("plan_version") in planned
             and set(r["variant_path"].replace("+", "/").split("/")) - planned[r["plan_version"]]]
    reasons = Counter((r["outcome"] if not r["ok"] else "late") for r in records if violated(r))
    return {"requests": n, "violations": bad, "violation_ratio": bad / n if n else None,
            "after_step": {"requests": in_after, "violations": bad_after,
                           "violation_ratio": bad_after / in_after if in_after else None},
            "steps": per_step, "plan_versions": len(versions), "version_range": versions[:1] + versions[-1:],
            "variant_paths": dict(paths.most_common()), "burst_answers": len(burst),
            "burst_answers_after_step": sum(any(st <= r["scheduled_s"] < st + after_s for st in steps) for r in burst), "violation_reasons": dict(reasons.most_common()),
            "timeline": timeline}


def print_summary(s: dict, every_s: float = 3.0) -> None:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"
    print(f"violations: {s['violations']} / {s['requests']} = {pct(s['violation_ratio'])}")
    a = s["after_step"]
    print(f"first seconds after a step: {a['violations']} / {a['requests']} = {pct(a['violation_ratio'])}")
    for x in s["steps"]:
        print(f"  step at {x['t_s']:5.1f} s to {x['to']:.2f} req/s: {x['violations']} / {x['requests']}")
    print(f"plan versions: {s['plan_versions']} (v{'..v'.join(str(v) for v in s['version_range'])})")
    print(f"violation reasons: {s['violation_reasons']}")
    print(f"variant paths (OK answers): {s['variant_paths']}")
    print(f"OK answers through a variant their plan does not run (burst): {s['burst_answers']} "
          f"({s['burst_answers_after_step']} in the seconds after a step)")
    print("   t_s  ver  active parked  demand  capacity  workers")
    next_t = 0.0
    for x in s["timeline"]:
        if x["t_s"] + 1e-9 < next_t:
            continue
        next_t = x["t_s"] + every_s
        fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
        print(f"{x['t_s']:6.1f} {x['version'] or '-':>4} {x['active'] or 0:6d} {x['parked'] if x['parked'] is not None else '-':>6}"
              f" {fmt(x['demand_qps']):>7} {fmt(x['capacity_qps']):>9}  "
              + " ".join(f"{k}x{v}" for k, v in sorted((x["workers"] or {}).items())))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from services.common.spec import load_spec
    from services.loadgen.records import write_records
    from services.loadgen.runner import LoadConfig, load_page_set, run_load
    from services.loadgen.schedule import RateShape
    from services.ocr.cer import page_cer
    from services.planner import load_profile
    from services.planner.capacity import max_demand
    from services.tools.calibrate import profile_for_host
    from services.tools.cluster import ClusterConfig, LocalCluster

    spec = load_spec(a.spec)
    profile_path, _ = profile_for_host(Path(a.spec), Path(a.profile), Path(a.models), Path(a.pages),
                                       cache_dir=Path(a.calibration_cache))
    profile = load_profile(profile_path)
    full = max_demand(profile, a.pool, spec.slo_ms, full_accuracy=True, method="exact").served_qps
    base = a.base_qps or full / a.headroom
    low, high = a.low * base, a.high * base
    shape = RateShape("square", rate=low, peak_rate=high, period_s=a.period, duty=0.5)
    print(f"profile {profile_path}; {a.pool} pool workers carry {full:.2f} req/s at full accuracy, "
          f"{base:.2f} req/s with headroom {a.headroom:g}; {shape.describe()}, {a.duration:g} s", flush=True)
    pages = load_page_set(a.pages)
    log_dir = Path(a.log_dir)
    cfg = ClusterConfig(spec=Path(a.spec), models=Path(a.models), pool=a.pool, log_dir=log_dir,
                        profile=profile_path, headroom=a.headroom, controller_args=tuple(a.controller_arg))
    t0 = time.monotonic()
    with LocalCluster(cfg) as cluster:
        print(f"cluster ready in {time.monotonic() - t0:.1f} s", flush=True)
        config = LoadConfig(target=cluster.front_door, pipeline=spec.name, shape=shape, duration_s=a.duration,
                            seed=a.seed, slo_ms=spec.slo_ms, progress=False,
                            controller=cluster.controller_address, plan_interval_s=0.5)
        report = asyncio.run(run_load(config, pages, cer_fn=page_cer))
        cluster.check_alive()
    write_records(log_dir / "records.jsonl", report.records)
    (log_dir / "plan_history.json").write_text(json.dumps(list(report.plan_history)) + "\n")
    s = summarise(report.records, list(report.plan_history), a.period, a.duration, a.after_s, low, high)
    s.update(full_capacity_qps=full, base_qps=base, low_qps=low, high_qps=high, profile=str(profile_path))
    print_summary(s)
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
