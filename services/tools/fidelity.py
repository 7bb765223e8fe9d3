"""``make fidelity``: the same arrivals on real processes and in the simulator, side by side.

    python -m services.tools.fidelity                                  # 4 shapes, ~90 s each
    python -m services.tools.fidelity --shapes square7x --duration 20  # a short run

For each arrival shape (``--shapes``):

* ``square3x`` / ``square7x``: square waves between ``--high-x`` (2.0) times what the pool
  carries at full accuracy and a third / a seventh of that, period ``--period`` (30 s);
* ``twitter``: ``traces/twitter_medium_normal.txt`` compressed 2x in time and scaled so its
  busiest 5 s window offers 2.5x that capacity (``make evaluate``'s recipe), cut at
  ``--duration``;
* ``diurnal``: one sine cycle from a quarter of that capacity up to ``--high-x`` times it
  and back over ``--duration``;

it starts a fresh local cluster (embedded Redis, the controller's planner on the profile
calibrated to this host, ``--pool`` pool workers, one router per stage:
``services.tools.cluster``, as ``make evaluate``), sends the arrivals with the load
generator (the schedule built by ``services.sim.scenario`` from the load generator's own
code), then simulates the same arrivals twice with the live model
(``services.sim.scenario.LIVE``, with ``cores`` = this host's CPUs):

* **sim**: on the calibrated profile, as predicted before the run;
* **sim, measured**: on that profile scaled by the batch times the run's controller
  measured (its last plan's ``calibration``), with the run's median model load time
  (workers' ``load_ms``) and median solve time (the controller's ``solve_ms``) as plan delay.

Reported per shape: violations overall (not answered OK within the SLO, counted at the
client) and among the requests sent in the ``--step-window-s`` (3 s) after each step up,
plan versions, mean active workers, and whether real and simulated violations are within
2x of each other or within one point (``services.sim.scenario.within``). Writes
``results.json`` and ``results.md`` in ``--out``; the services' logs, records and plan
histories in ``--log-dir``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = ("square3x", "square7x", "twitter", "diurnal")
TRACE = "traces/twitter_medium_normal.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.tools.fidelity",
                                description="The same arrivals on a local cluster and in the simulator, side by "
                                            "side: violations overall and after each step (docs/evaluation.md).")
    p.add_argument("--out", default="runs/fidelity", help="results.json and results.md (default %(default)s)")
    p.add_argument("--log-dir", default="runs/fidelity/logs")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--duration", type=float, default=90.0, help="seconds per shape (default %(default)g)")
    p.add_argument("--period", type=float, default=30.0, help="square waves' period (default %(default)g s)")
    p.add_argument("--high-x", type=float, default=2.0,
                   help="square and diurnal peaks: this times the pool's full-accuracy capacity (default 2)")
    p.add_argument("--trace-peak-x", type=float, default=2.5, help="twitter: busiest 5 s window (default 2.5)")
    p.add_argument("--time-scale", type=float, default=0.5, help="twitter: time compression (default 0.5)")
    p.add_argument("--pool", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--step-window-s", type=float, default=3.0)
    p.add_argument("--spec", default="pipelines/ocr.yaml")
    p.add_argument("--profile", default="profiles/ocr_cpu.json", help="profile to calibrate to this host")
    p.add_argument("--calibration-cache", default="runs/profiles")
    p.add_argument("--models", default="models")
    p.add_argument("--pages", default="data/eval")
    p.add_argument("--resimulate", default=None, metavar="RESULTS_JSON",
                   help="run only the simulator again, with this code, against an earlier run's "
                        "results.json (its live figures and measurements, the same arrivals)")
    p.add_argument("--cores", type=float, default=None,
                   help="cores the simulated workers share (default: this host's CPU count)")
    return p


def arrivals_for(shape: str, a, full: float):
    from services.sim import scenario as sc

    high = a.high_x * full
    if shape in ("square3x", "square7x"):
        k = 3.0 if shape == "square3x" else 7.0
        return sc.shape_arrivals(sc.square_shape(high / k, high, a.period), a.duration, a.seed)
    if shape == "diurnal":
        return sc.shape_arrivals(sc.diurnal_shape(full / 4.0, high, a.duration), a.duration, a.seed)
    scale = sc.rate_scale_for_peak(TRACE, a.time_scale, 5.0, a.trace_peak_x * full)
    return sc.trace_arrivals(TRACE, a.time_scale, scale, a.seed, a.duration)


def median_logged(paths, key: str) -> float | None:
    """The median of ``key=<number>`` (or ``"key": <number>``) over the lines of ``paths``."""
    pat = re.compile(rf'\b{key}["=:\s]+([0-9.]+)')
    vals = []
    for p in paths:
        if Path(p).exists():
            vals += [float(m.group(1)) for m in pat.finditer(Path(p).read_text(errors="replace"))]
    return statistics.median(vals) if vals else None


def run_live(a, shape: str, arrivals, profile_path: Path, pages, log_dir: Path, slo_ms: float) -> dict:
    """One fresh cluster, the arrivals sent by the load generator."""
    from services.loadgen.runner import LoadConfig, run_load
    from services.loadgen.schedule import Arrival
    from services.ocr.cer import page_cer
    from services.tools.cluster import ClusterConfig, LocalCluster
    from services.tools.demo import final_plan

    schedule = [Arrival(float(t)) for t in arrivals.times_s]
    cfg = ClusterConfig(spec=Path(a.spec), models=Path(a.models), pool=a.pool, log_dir=log_dir, profile=profile_path)
    with LocalCluster(cfg) as cluster:
        # the load generator is told the shape (or a constant rate for a trace) only to pass its
        # checks; the schedule it sends is the one given
        load = LoadConfig(target=cluster.front_door, pipeline=cluster.spec.name, slo_ms=slo_ms, progress=False,
                          controller=cluster.controller_address, seed=a.seed,
                          **({"shape": arrivals.shape, "duration_s": arrivals.duration_s} if arrivals.shape
                             else {"trace": Path(TRACE), "duration_s": arrivals.duration_s}))
        report = asyncio.run(run_load(load, pages, schedule=schedule, cer_fn=page_cer))
        cluster.check_alive()
        plan = final_plan(cluster)
    records = sorted(report.records, key=lambda r: r["index"])
    history = [s for s in report.plan_history if "error" not in s]
    workers = sorted(log_dir.glob("worker-*.log"))
    return {"records": records, "history": history,
            "calibration": dict((plan or {}).get("calibration") or {}),
            "load_ms": median_logged(workers, "load_ms"),
            "solve_ms": median_logged([log_dir / "controller.log"], "solve_ms")}


def live_metrics(data: dict, arrivals, window_s: float) -> dict:
    from services.sim.scenario import step_windows, violation_ratio

    rec = data["records"]
    t = np.array([r["scheduled_s"] for r in rec], dtype=float)
    good = np.array([bool(r["ok"]) and bool(r["on_time"]) for r in rec])
    versions = {s.get("version") for s in data["history"] if s.get("version") is not None}
    active = [s.get("active_workers", 0) for s in data["history"]]
    outcomes: dict[str, int] = {}
    for r in rec:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {"requests": len(rec), "violation_ratio": violation_ratio(good),
            "after_steps": step_windows(t, good, arrivals.steps, window_s),
            "plan_versions": len(versions), "mean_active_workers": float(np.mean(active)) if active else None,
            "outcomes": dict(sorted(outcomes.items()))}


def simulate(profile, arrivals, a, slo_ms: float, load_s: float | None = None, plan_delay_s: float | None = None):
    from services.sim import SimConfig
    from services.sim import simulate as run_sim
    from services.policy.planning import settle
    from services.sim.policies import OursPolicy
    from services.sim.run import summarise
    from services.sim.scenario import live_config

    over = {}
    if load_s is not None:
        over["load_s"] = load_s
    if plan_delay_s is not None:
        over["plan_delay_s"] = plan_delay_s
    cfg = live_config(SimConfig(n_workers=a.pool, seed=a.seed, slo_ms=slo_ms, cores=a.cores), **over)
    policy = OursPolicy(profile, a.pool)
    settle(policy.planner)     # the controller's dwell, peak hold and off-peak headroom
    res = run_sim(profile, arrivals.times_s, policy, cfg)
    d = summarise(res, arrivals, a.step_window_s)
    d["config"] = {k: v for k, v in cfg.__dict__.items()}
    return d


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def steps_cell(m: dict) -> str:
    up = m["after_steps"]["up"]
    if not m["after_steps"]["steps"]:
        return "no steps"
    return f"{up['violations']}/{up['requests']} ({pct(up['violation_ratio'])})"


def table(results: dict) -> str:
    from services.sim.scenario import within

    rows = ["| shape | run | requests | violations | 3 s after steps up | plan versions | active workers "
            "| within 2x or 1 pt of the cluster |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for shape, r in results["shapes"].items():
        live = r["live"]
        for label, m in (("cluster", live), ("simulator", r.get("sim")), ("simulator, measured", r.get("sim_measured"))):
            if not m:
                continue
            if m is live:
                verdict = ""
            else:
                ok_all = within(live["violation_ratio"], m["violation_ratio"])
                ok_up = within(live["after_steps"]["up"]["violation_ratio"], m["after_steps"]["up"]["violation_ratio"])
                verdict = ("yes" if ok_all else "**no**") + (
                    "" if ok_up is None else f"; after steps {'yes' if ok_up else '**no**'}")
            aw = m["mean_active_workers"]
            rows.append(f"| {shape} | {label} | {m['requests']} | {pct(m['violation_ratio'])} | {steps_cell(m)} "
                        f"| {m['plan_versions']} | {'n/a' if aw is None else f'{aw:.2f}'} | {verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    if not shapes or any(s not in SHAPES for s in shapes):
        print(f"error: --shapes takes a subset of {', '.join(SHAPES)}, got {a.shapes!r}", file=sys.stderr)
        return 2
    if a.pool < 2 or a.duration <= 0:
        print("error: --pool must be at least 2 and --duration positive", file=sys.stderr)
        return 2
    for path, hint in ((Path(a.models), "make models"), (Path(a.pages), "make data")):
        if not path.exists():
            print(f"error: {path} does not exist; run `{hint}` first", file=sys.stderr)
            return 2
    a.cores = a.cores or float(os.cpu_count() or 1)
    t_start = time.monotonic()
    from services.common.spec import load_spec
    from services.loadgen.runner import load_page_set
    from services.loadgen.records import write_records
    from services.planner import load_profile
    from services.planner.capacity import max_demand
    from services.tools.calibrate import host_description, profile_for_host
    from services.tools.evaluate import measured_profile

    out, logs = Path(a.out), Path(a.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(a.spec)
    profile_path, _ = profile_for_host(Path(a.spec), Path(a.profile), Path(a.models), Path(a.pages),
                                       cache_dir=Path(a.calibration_cache))
    profile = load_profile(profile_path)
    full = max_demand(profile, a.pool, spec.slo_ms, full_accuracy=True, method="exact").served_qps
    pages = load_page_set(a.pages)
    print(f"host: {host_description()}\nprofile: {profile_path}\n{a.pool} pool workers carry {full:.2f} req/s "
          f"at full accuracy; simulated workers share {a.cores:g} cores", flush=True)
    results: dict = {"command": "python -m services.tools.fidelity " + " ".join(
                         shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "host": f"{host_description()} ({platform.node()})", "load_average": os.getloadavg()[0],
                     "profile": str(profile_path), "pool": a.pool, "full_capacity_qps": full, "shapes": {}}
    earlier = json.loads(Path(a.resimulate).read_text())["shapes"] if a.resimulate else None
    if earlier is not None:
        shapes = [s for s in shapes if s in earlier]
        results["resimulated"] = a.resimulate
    for shape in shapes:
        arrivals = arrivals_for(shape, a, full)
        if earlier is not None:      # the live side as it was measured then
            data = {"calibration": None, "load_ms": None, "solve_ms": None, **earlier[shape]["measured"]}
            live = earlier[shape]["live"]
            print(f"== {shape}: {arrivals.describe}: the cluster's figures from {a.resimulate}", flush=True)
        else:
            print(f"== {shape}: {arrivals.describe}: {arrivals.times_s.size} requests; live cluster ...",
                  flush=True)
            t0 = time.monotonic()
            data = run_live(a, shape, arrivals, profile_path, pages, logs / shape, spec.slo_ms)
            write_records(logs / f"{shape}.records.jsonl", data["records"])
            live = live_metrics(data, arrivals, a.step_window_s)
            print(f"   {shape} cluster: violations {pct(live['violation_ratio'])}, after steps up "
                  f"{steps_cell(live)}, {live['plan_versions']} plan versions ({time.monotonic() - t0:.0f} s); "
                  f"simulator ...", flush=True)
        r = {"arrivals": arrivals.describe, "steps": [s.__dict__ for s in arrivals.steps], "live": live,
             "measured": {k: data[k] for k in ("calibration", "load_ms", "solve_ms")},
             "sim": simulate(profile, arrivals, a, spec.slo_ms)}
        if data["calibration"] or data["load_ms"] or data["solve_ms"]:
            prof = measured_profile(profile, data["calibration"]) if data["calibration"] else profile
            r["sim_measured"] = simulate(prof, arrivals, a, spec.slo_ms,
                                         load_s=None if data["load_ms"] is None else data["load_ms"] / 1000.0,
                                         plan_delay_s=None if data["solve_ms"] is None else data["solve_ms"] / 1000.0)
        results["shapes"][shape] = r
        sims = [(k, r[k]) for k in ("sim", "sim_measured") if k in r]
        print("   " + "; ".join(f"{shape} {k}: violations {pct(m['violation_ratio'])}, after steps up "
                                f"{steps_cell(m)}" for k, m in sims), flush=True)
    results["wall_s"] = time.monotonic() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    md = [f"Command: `{results['command']}`  ", f"Date: {results['date']}  ", f"Host: {results['host']}, "
          f"load average {results['load_average']:.1f} at the start  ", f"Profile: `{results['profile']}`, "
          f"{a.pool} pool workers, {full:.2f} req/s at full accuracy", "", table(results), ""]
    (out / "results.md").write_text("\n".join(md))
    print(table(results))
    print(f"wrote {out}/results.json, results.md in {results['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
