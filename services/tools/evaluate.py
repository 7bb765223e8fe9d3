"""``make evaluate``: the OCR pipeline on a local cluster under a compressed Twitter trace,
three ways, next to what the simulator predicts for the same arrivals (docs/evaluation.md).

    python -m services.tools.evaluate --out docs/evaluation            # about 8 minutes
    python -m services.tools.evaluate --out /tmp/ev --quick --duration 8   # a smoke run

Steps:

1. the profile that fits this host (``pipeserve-calibrate``'s probe, cached in runs/profiles);
2. the full-accuracy capacity of ``--pool`` workers on it (``services.planner.capacity``);
3. the trace (default traces/twitter_medium_normal.txt) compressed in time by
   ``--time-scale`` and scaled in rate so that its busiest ``--window-s`` window offers
   ``--peak-factor`` times that capacity (the brief's rate recipe, seeded);
4. for each policy a fresh cluster (embedded Redis, controller, one router per stage,
   ``--pool`` pool workers) and the same arrivals from the open-loop load generator:

   * ``planner``: the controller's planner on the calibrated profile (accuracy scaling,
     its defaults otherwise);
   * ``hardware-only``: the same planner with ``--hardware-only`` (a floor at the best
     accuracy: more replicas of the most accurate variants, never cheaper ones);
   * ``static``: an operator plan file provisioned for the peak at full accuracy: every
     worker on the plan that serves the most at full accuracy (``max_demand(...,
     full_accuracy=True)``), never changed;
   * ``planner-no-burst`` (only when ``--policies`` names it): the planner with burst
     variants off (``--burst off`` on the controller and the workers);

5. the simulator (services/sim) on the same arrival times, the same profile and the same
   number of workers, with the matching policies (the controller's planner object, the
   same with a full-accuracy floor, and the static plan); once on the calibrated profile
   (what the simulator predicts before the run) and once on that profile with the batch
   times the run's controller measured at its end (``calibration`` of its last plan; the
   planner run's for the static one, whose controller measures none): how much of the
   gap the slower batches explain;
6. ``results.json`` (every number, the trace's parameters, the host), ``results.md`` (the
   table) and the load generator's figures (``figures/``) in ``--out``; per-request
   records and plan histories (``<policy>.records.jsonl``, ``<policy>.plan_history.json``)
   and the services' logs (``<policy>/``) in ``--log-dir`` (default runs/evaluate).

Windows: a request belongs to the *peak* when the offered rate of its ``--window-s``
window (from the schedule) is at least the full-accuracy capacity, to the *off-peak* when
it is at most half of it. Violation = not answered OK within the SLO (end to end, from
the scheduled send time). CER = mean character error rate of the OK answers. Goodput =
answers OK within the SLO per second. Active workers = workers in the plan in force,
sampled every second (the rest of the pool is parked: no model loaded).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POLICIES = ("planner", "hardware-only", "static", "planner-no-burst")
DEFAULT_POLICIES = ("planner", "hardware-only", "static")
SIM_POLICY = {"planner": "ours (PlannerPolicy)", "hardware-only": "ours, full-accuracy floor",
              "static": "static plan", "planner-no-burst": "ours, no burst variants"}


@dataclass(frozen=True)
class TraceSetup:
    path: Path
    time_scale: float
    rate_scale: float
    seed: int
    duration_s: float | None
    window_s: float
    full_capacity_qps: float      # of the pool at full accuracy, on the calibrated profile
    scaled_capacity_qps: float    # with accuracy scaling
    peak_factor: float


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-evaluate",
        description="The OCR pipeline on a local cluster under a compressed trace with peaks well "
                    "above full-accuracy capacity: the planner vs hardware scaling only vs a static "
                    "configuration, beside the simulator's prediction (docs/evaluation.md).")
    p.add_argument("--out", default="docs/evaluation", help="output directory (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: the trace compressed 20x instead of 2x (use with --duration)")
    p.add_argument("--spec", default="pipelines/ocr.yaml")
    p.add_argument("--profile", default="profiles/ocr_cpu.json", help="profile to calibrate to this host")
    p.add_argument("--calibration-cache", default="runs/profiles")
    p.add_argument("--models", default="models")
    p.add_argument("--pages", default="data/eval")
    p.add_argument("--trace", default="traces/twitter_medium_normal.txt")
    p.add_argument("--time-scale", type=float, default=None,
                   help="multiply arrival times by this (default 0.5; --quick 0.05)")
    p.add_argument("--peak-factor", type=float, default=2.5,
                   help="the busiest window offers this multiple of the pool's full-accuracy capacity")
    p.add_argument("--window-s", type=float, default=None,
                   help="window for the offered rate, peak and off-peak (default 5 s; --quick 1 s)")
    p.add_argument("--duration", type=float, default=None, help="cut the replay after this many seconds")
    p.add_argument("--pool", type=int, default=3, help="pool workers (default 3)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated subset of {', '.join(POLICIES)} (default "
                        f"{','.join(DEFAULT_POLICIES)}; planner-no-burst: the planner with "
                        "burst variants off, on the controller and the workers)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-dir", default="runs/evaluate",
                   help="service logs (a folder per policy), records and plan histories (default %(default)s)")
    p.add_argument("--no-sim", action="store_true", help="skip the simulator's prediction")
    p.add_argument("--no-figures", action="store_true")
    return p


# -- the trace ----------------------------------------------------------------------
def peak_trace_rate(entries, window_s: float) -> float:
    """Highest arrival rate (req/s) over ``window_s`` windows of the unscaled trace."""
    t = np.array([e.arrival_ms for e in entries]) / 1000.0
    edges = np.arange(0.0, t.max() + window_s, window_s)
    counts, _ = np.histogram(t, bins=edges)
    return float(counts.max()) / window_s


def offered_rate(times_s: np.ndarray, window_s: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(window start times, offered req/s per window) of a schedule."""
    n = max(1, int(math.ceil(horizon_s / window_s)))
    edges = np.arange(n + 1) * window_s
    counts, _ = np.histogram(times_s, bins=edges)
    return edges[:-1], counts / window_s


def phase_of(t: np.ndarray, starts: np.ndarray, rates: np.ndarray, window_s: float, cap: float) -> np.ndarray:
    """Per time: 'peak' (offered >= cap), 'off' (<= cap / 2) or '' (in between)."""
    idx = np.clip((np.asarray(t, dtype=float) // window_s).astype(int), 0, len(rates) - 1)
    r = rates[idx]
    return np.where(r >= cap, "peak", np.where(r <= cap / 2, "off", ""))


# -- metrics ------------------------------------------------------------------------
def summarise(t: np.ndarray, good: np.ndarray, ok: np.ndarray, cer: np.ndarray, phase: np.ndarray,
              active_t: np.ndarray, active: np.ndarray, active_phase: np.ndarray,
              seconds: dict[str, float]) -> dict:
    """The table's numbers for one run (real or simulated). ``good``: OK within the SLO;
    ``cer``: per request (NaN unless OK); ``seconds``: length of each phase."""
    out = {}
    for name, sel in (("all", np.ones_like(good, dtype=bool)), ("peak", phase == "peak"), ("off", phase == "off")):
        n = int(sel.sum())
        g = int((good & sel).sum())
        c = cer[sel & ok & ~np.isnan(cer)]
        a = active[active_phase == name] if name != "all" else active
        out[name] = {
            "requests": n, "on_time": g, "violations": n - g,
            "violation_ratio": (n - g) / n if n else None,
            "ok": int((ok & sel).sum()),
            "mean_cer": float(c.mean()) if c.size else None,
            "goodput_qps": g / seconds[name] if seconds.get(name) else None,
            "mean_active_workers": float(a.mean()) if a.size else None,
        }
    return out


def real_metrics(records: list[dict], history: list[dict], starts, rates, window_s: float, cap: float,
                 seconds: dict[str, float]) -> dict:
    t = np.array([r["scheduled_s"] for r in records], dtype=float)
    ok = np.array([bool(r["ok"]) for r in records])
    good = np.array([bool(r["ok"]) and bool(r["on_time"]) for r in records])
    cer = np.array([np.nan if r.get("cer") is None else float(r["cer"]) for r in records])
    samples = [s for s in history if "error" not in s]
    at = np.array([s["t_s"] for s in samples], dtype=float)
    active = np.array([s.get("active_workers", 0) for s in samples], dtype=float)
    m = summarise(t, good, ok, cer, phase_of(t, starts, rates, window_s, cap), at, active,
                  phase_of(at, starts, rates, window_s, cap), seconds)
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    m["outcomes"] = dict(sorted(outcomes.items()))
    paths: dict[str, int] = {}
    for r in records:
        if r["ok"] and r.get("variant_path"):
            paths[r["variant_path"]] = paths.get(r["variant_path"], 0) + 1
    m["variant_paths"] = dict(sorted(paths.items(), key=lambda kv: -kv[1]))
    reasons: dict[str, int] = {}
    for r in records:
        if not (r["ok"] and r["on_time"]):
            why = "late (answered after the SLO)" if r["ok"] else \
                f"{r['outcome']}: {re.sub(r'[0-9.]+', 'N', (r.get('message') or '')[:80])}"
            reasons[why] = reasons.get(why, 0) + 1
    m["violation_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    m["plan_versions"] = len({s.get("version") for s in samples if s.get("version") is not None})
    return m


def sim_metrics(res, starts, rates, window_s: float, cap: float, seconds: dict[str, float]) -> dict:
    from services.sim.metrics import OK

    t = np.asarray(res.arrival_s, dtype=float)
    ok = res.status == OK
    cer = np.where(ok, 1.0 - res.accuracy, np.nan)
    at = np.asarray(res.series["t"], dtype=float)
    active = np.asarray(res.series["active"], dtype=float)
    m = summarise(t, ok, ok, cer, phase_of(t, starts, rates, window_s, cap), at, active,
                  phase_of(at, starts, rates, window_s, cap), seconds)
    m["expected_cer_note"] = "1 - the profile's path accuracy of each OK answer"
    return m


# -- the runs -----------------------------------------------------------------------
def static_plan(profile, n: int, slo_ms: float, path: Path) -> list[tuple[str, str, int, int]]:
    """Write the operator plan provisioned for the peak at full accuracy: every worker on
    the allocation that serves the most demand at full accuracy."""
    from services.planner.capacity import max_demand

    sol = max_demand(profile, n, slo_ms, full_accuracy=True, method="exact")
    if not sol.ok:
        raise SystemExit(f"no full-accuracy plan for {n} workers: {sol.message}")
    allocs = [(a.task, a.variant, a.batch_size, a.replicas) for a in sol.allocations if a.replicas]
    spare = n - sum(a[3] for a in allocs)
    if spare > 0:   # every worker active: spares join the last-listed (most loaded) stage
        t, v, b, r = allocs[0]
        allocs[0] = (t, v, b, r + spare)
    lines = ["# written by services/tools/evaluate.py: static provisioning for the peak at full",
             f"# accuracy ({n} workers, the allocation that serves the most at full accuracy)",
             f"pipeline: {profile.name}", "allocations:"]
    lines += [f"  - {{task: {t}, variant: {v}, batch_size: {b}, replicas: {r}}}" for t, v, b, r in allocs]
    path.write_text("\n".join(lines) + "\n")
    return allocs


def run_policy(policy: str, a, profile_path: Path, plan_path: Path, schedule, trace: TraceSetup,
               pages, log_dir: Path, slo_ms: float) -> tuple[dict, float]:
    from services.loadgen.runner import LoadConfig, run_load
    from services.ocr.cer import page_cer
    from services.tools.cluster import ClusterConfig, LocalCluster
    from services.tools.demo import final_plan

    if policy == "static":
        source = {"plan_file": plan_path}
        extra: tuple[str, ...] = ()
    else:
        source = {"profile": profile_path}
        extra = {"hardware-only": ("--hardware-only",), "planner-no-burst": ("--burst", "off")}.get(policy, ())
    worker_extra = ("--burst", "off") if policy == "planner-no-burst" else ()
    cfg = ClusterConfig(spec=Path(a.spec), models=Path(a.models), pool=a.pool, log_dir=log_dir,
                        controller_args=extra, worker_args=worker_extra, **source)
    t0 = time.monotonic()
    with LocalCluster(cfg) as cluster:
        if policy == "static":   # every pool worker in the plan before the load starts
            cluster.wait_planned(a.pool, 120)
        ready = time.monotonic() - t0
        config = LoadConfig(target=cluster.front_door, pipeline=cluster.spec.name, trace=trace.path,
                            time_scale=trace.time_scale, rate_scale=trace.rate_scale, seed=trace.seed,
                            duration_s=trace.duration_s, slo_ms=slo_ms, progress=False,
                            controller=cluster.controller_address)
        report = asyncio.run(run_load(config, pages, schedule=schedule, cer_fn=page_cer))
        cluster.check_alive()
        plan = final_plan(cluster)
    return {"records": report.records, "plan_history": list(report.plan_history),
            "ready_s": round(ready, 1),
            # measured / profile batch time per "task/variant", as the controller last saw it
            "calibration": dict((plan or {}).get("calibration") or {})}, time.monotonic() - t0


def measured_profile(profile, calibration: dict[str, float]):
    """The profile with the latencies the controller measured on the cluster."""
    from services.policy.calibration import scale_profile

    factors = {tuple(k.split("/", 1)): float(f) for k, f in calibration.items() if "/" in k}
    return scale_profile(profile, factors, note="the cluster's measured batch times")


def simulate_policy(policy: str, profile, arrivals: np.ndarray, n: int, seed: int):
    from services.sim import SimConfig, simulate
    from services.sim.policies import ClipperPolicy, OursPolicy

    if policy == "planner":
        pol = OursPolicy(profile, n)
    elif policy == "planner-no-burst":
        pol = OursPolicy(profile, n, spill=False, name="planner-no-burst")
    elif policy == "hardware-only":
        pol = OursPolicy(profile, n, full_accuracy_only=True, name="hardware-only")
    else:
        pol = ClipperPolicy(profile, n, highest=True)   # the same allocation as the static plan file
    return simulate(profile, arrivals, pol, SimConfig(n_workers=n, seed=seed))


# -- output -------------------------------------------------------------------------
def plot_cluster_vs_sim(results: dict, path: Path) -> Path:
    """Bars per policy, cluster beside simulator: violations at peak, CER, active workers off-peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("peak", "violation_ratio", "SLO violations at peak", 100.0, "%"),
              ("all", "mean_cer", "CER of the answers (all)", 100.0, "%"),
              ("off", "mean_active_workers", "active workers off-peak", 1.0, "workers"))
    policies = list(results["runs"])
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.6))
    x = np.arange(len(policies))
    for ax, (phase, key, title, mult, unit) in zip(axes, panels):
        for k, (kind, label, color) in enumerate((("real", "cluster", "tab:blue"), ("sim", "simulator", "tab:grey"))):
            vals = [(results["runs"][p].get(kind) or {}).get(phase, {}).get(key) for p in policies]
            ax.bar(x + (k - 0.5) * 0.38, [np.nan if v is None else v * mult for v in vals], 0.38,
                   label=label, color=color)
        ax.set_xticks(x, policies)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(x, kind: str) -> str:
    if x is None:
        return "n/a"
    return {"pct": f"{100 * x:.1f} %", "cer": f"{100 * x:.2f} %", "qps": f"{x:.2f}",
            "w": f"{x:.2f}"}[kind]


def table(results: dict) -> str:
    head = ("| policy | run | violations (all) | at peak | off-peak | CER (all) | CER at peak "
            "| goodput req/s (all) | at peak | active workers at peak | off-peak |")
    rows = [head, "|" + "---|" * 11]
    for policy, r in results["runs"].items():
        for label, m in (("cluster", r.get("real")), ("simulator", r.get("sim")),
                         ("simulator, measured latencies", r.get("sim_measured"))):
            if not m:
                continue
            rows.append(f"| {policy} | {label} | {fmt(m['all']['violation_ratio'], 'pct')} "
                        f"| {fmt(m['peak']['violation_ratio'], 'pct')} | {fmt(m['off']['violation_ratio'], 'pct')} "
                        f"| {fmt(m['all']['mean_cer'], 'cer')} | {fmt(m['peak']['mean_cer'], 'cer')} "
                        f"| {fmt(m['all']['goodput_qps'], 'qps')} | {fmt(m['peak']['goodput_qps'], 'qps')} "
                        f"| {fmt(m['peak']['mean_active_workers'], 'w')} | {fmt(m['off']['mean_active_workers'], 'w')} |")
    return "\n".join(rows)


def results_md(results: dict) -> str:
    tr = results["trace"]
    lines = [
        "# Evaluation results (generated by services/tools/evaluate.py; see docs/evaluation.md)", "",
        f"Command: `{results['command']}`  ", f"Date: {results['date']}  ", f"Host: {results['host']}  ",
        f"Wall time: {results['wall_s']:.0f} s", "",
        f"Trace: `{tr['path']}`, time scale {tr['time_scale']:g}, rate scale {tr['rate_scale']:.4f}, "
        f"seed {tr['seed']}: {tr['requests']} requests over {tr['span_s']:.0f} s, busiest {tr['window_s']:g} s "
        f"window {tr['peak_qps']:.1f} req/s, quietest {tr['min_qps']:.1f} req/s. "
        f"{results['pool']} pool workers; full-accuracy capacity {tr['full_capacity_qps']:.2f} req/s, "
        f"with accuracy scaling {tr['scaled_capacity_qps']:.2f} req/s (calibrated profile "
        f"`{results['profile']}`, p95 latencies). Peak = windows offering >= the full-accuracy capacity "
        f"({tr['peak_s']:.0f} s), off-peak = <= half of it ({tr['off_s']:.0f} s).", "",
        table(results), "",
        "Outcomes per run (cluster): " + "; ".join(
            f"{p}: {', '.join(f'{k} {v}' for k, v in r['real']['outcomes'].items())}, "
            f"{r['real']['plan_versions']} plan version(s)"
            for p, r in results["runs"].items() if r.get("real")), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        print(f"error: --policies takes a subset of {', '.join(POLICIES)}, got {a.policies!r}", file=sys.stderr)
        return 2
    if a.pool < 2:
        print("error: --pool must be at least 2 (one worker per task)", file=sys.stderr)
        return 2
    if a.peak_factor <= 0:
        print("error: --peak-factor must be positive", file=sys.stderr)
        return 2
    for path, hint in ((Path(a.models), "make models"), (Path(a.pages), "make data"), (Path(a.trace), "")):
        if not path.exists():
            print(f"error: {path} does not exist" + (f"; run `{hint}` first" if hint else ""), file=sys.stderr)
            return 2
    t_start = time.monotonic()
    from services.common.spec import load_spec
    from services.loadgen.figures import Run, write_figures
    from services.loadgen.records import write_records
    from services.loadgen.runner import load_page_set
    from services.loadgen.schedule import read_trace, trace_schedule
    from services.planner import load_profile
    from services.planner.capacity import max_demand
    from services.tools.calibrate import host_description, profile_for_host

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_spec(a.spec)
    time_scale = a.time_scale or (0.05 if a.quick else 0.5)
    window_s = a.window_s or (1.0 if a.quick else 5.0)

    # 1-2. this host's profile and the pool's capacity on it
    profile_path, _ = profile_for_host(Path(a.spec), Path(a.profile), Path(a.models), Path(a.pages),
                                       cache_dir=Path(a.calibration_cache))
    profile = load_profile(profile_path)
    full = max_demand(profile, a.pool, spec.slo_ms, full_accuracy=True, method="exact").served_qps
    scaled = max_demand(profile, a.pool, spec.slo_ms, method="exact").served_qps

    # 3. the trace: busiest window at peak_factor x full capacity after time compression
    entries = read_trace(a.trace)
    trace_peak = peak_trace_rate(entries, window_s / time_scale)
    rate_scale = a.peak_factor * full * time_scale / trace_peak
    trace = TraceSetup(Path(a.trace), time_scale, rate_scale, a.seed, a.duration, window_s, full, scaled,
                       a.peak_factor)
    schedule = trace_schedule(entries, time_scale=time_scale, rate_scale=rate_scale, seed=a.seed,
                              duration_s=a.duration)
    if not schedule:
        print("error: the scaled trace has no arrivals (longer --duration?)", file=sys.stderr)
        return 2
    times = np.array([x.t_s for x in schedule])
    span = float(a.duration if a.duration is not None else times.max())
    starts, rates = offered_rate(times, window_s, span)
    n_full = int(len(rates))
    seconds = {"all": span, "peak": float((rates >= full).sum() * window_s),
               "off": float((rates <= full / 2).sum() * window_s)}
    # the last window may be partial: count only what lies within the span
    last = span - (n_full - 1) * window_s
    for key, sel in (("peak", rates[-1] >= full), ("off", rates[-1] <= full / 2)):
        if sel:
            seconds[key] -= window_s - last
    print(f"host: {host_description()}\nprofile: {profile_path}\n{a.pool} pool workers: "
          f"{full:.2f} req/s at full accuracy, {scaled:.2f} req/s with accuracy scaling\n"
          f"trace {a.trace} x{time_scale:g} in time, x{rate_scale:.4f} in rate: {len(schedule)} requests "
          f"over {span:.0f} s, {rates.max():.1f} req/s at peak ({rates.max() / full:.2f}x), "
          f"peak {seconds['peak']:.0f} s, off-peak {seconds['off']:.0f} s", flush=True)

    pages = load_page_set(a.pages)
    plan_path = out / "static-plan.yaml"
    static_allocs = static_plan(profile, a.pool, spec.slo_ms, plan_path)
    results: dict = {
        "command": "python -m services.tools.evaluate " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{host_description()} ({platform.node()})", "profile": str(profile_path), "pool": a.pool,
        "slo_ms": spec.slo_ms,
        "trace": {"path": a.trace, "time_scale": time_scale, "rate_scale": rate_scale, "seed": a.seed,
                  "duration_s": a.duration, "requests": len(schedule), "span_s": span, "window_s": window_s,
                  "peak_qps": float(rates.max()), "min_qps": float(rates.min()), "full_capacity_qps": full,
                  "scaled_capacity_qps": scaled, "peak_factor": a.peak_factor, "peak_s": seconds["peak"],
                  "off_s": seconds["off"], "offered_qps": [round(float(x), 3) for x in rates]},
        "static_plan": [dict(zip(("task", "variant", "batch_size", "replicas"), x)) for x in static_allocs],
        "runs": {},
    }
    runs_dir = Path(a.log_dir)   # per-request records and plan histories: big, kept out of --out
    figure_runs = []
    calibrations: dict[str, dict[str, float]] = {}
    for policy in policies:
        print(f"== {policy}: starting the cluster ...", flush=True)
        data, wall = run_policy(policy, a, profile_path, plan_path, schedule, trace, pages,
                                Path(a.log_dir) / policy, spec.slo_ms)
        write_records(runs_dir / f"{policy}.records.jsonl", data["records"])
        (runs_dir / f"{policy}.plan_history.json").write_text(json.dumps(data["plan_history"]) + "\n")
        m = real_metrics(data["records"], data["plan_history"], starts, rates, window_s, full, seconds)
        results["runs"][policy] = {"real": m, "ready_s": data["ready_s"], "wall_s": round(wall, 1),
                                   "calibration": data["calibration"]}
        calibrations[policy] = data["calibration"]
        figure_runs.append(Run(policy, data["records"], data["plan_history"]))
        print(f"   {policy}: violations {fmt(m['all']['violation_ratio'], 'pct')} (peak "
              f"{fmt(m['peak']['violation_ratio'], 'pct')}, off-peak {fmt(m['off']['violation_ratio'], 'pct')}), "
              f"CER {fmt(m['all']['mean_cer'], 'cer')}, active workers peak "
              f"{fmt(m['peak']['mean_active_workers'], 'w')} / off-peak {fmt(m['off']['mean_active_workers'], 'w')}"
              f" ({wall:.0f} s)", flush=True)
    if not a.no_sim:
        # the factors of the planner's run (all of its variants) unless a run has its own
        fallback = next((calibrations[p] for p in ("planner", "planner-no-burst", "hardware-only")
                         if calibrations.get(p)), {})
        for policy in policies:
            r = results["runs"][policy]
            res = simulate_policy(policy, profile, times, a.pool, a.seed)
            r["sim"] = sim_metrics(res, starts, rates, window_s, full, seconds)
            r["sim_policy"] = SIM_POLICY[policy]
            factors = calibrations.get(policy) or fallback
            if factors:
                res = simulate_policy(policy, measured_profile(profile, factors), times, a.pool, a.seed)
                r["sim_measured"] = sim_metrics(res, starts, rates, window_s, full, seconds)
                r["sim_measured_factors"] = factors
    if not a.no_figures:
        paths = write_figures(figure_runs, out / "figures")
        paths.append(plot_cluster_vs_sim(results, out / "figures" / "cluster_vs_sim.png"))
        results["figures"] = [str(p.relative_to(out)) for p in paths]
    results["wall_s"] = time.monotonic() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    (out / "results.md").write_text(results_md(results))
    print(table(results))
    print(f"wrote {out}/results.json, results.md" + ("" if a.no_figures else ", figures/") +
          f" in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
