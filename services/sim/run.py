"""``python -m services.sim run``: one policy on one arrival shape, printed.

    python -m services.sim run --profile runs/profiles/ocr-<host>.json --spec pipelines/ocr.yaml \\
        --workers 3 --shape square --low 1.1 --high 7.2 --period 30 --duration 90
    python -m services.sim run ... --trace traces/twitter_medium_normal.txt --time-scale 0.5 --rate-scale 0.09
    python -m services.sim run ... --shape diurnal --low 0.5 --high 7 --period 90 --duration 90

Square waves, steps, constant rates and (with ``--low``/``--high``) diurnal cycles are the load
generator's own shapes and schedule (``services.loadgen.schedule``), so ``pipeserve-loadgen
--shape square ...`` with the same numbers and seed sends the same requests. The live model
(``services.sim.scenario.LIVE``: front-door reports, the controller's loop period, front-door
time, plan delay, client deadlines, a cold start) is on unless ``--model ideal``.
"""
from __future__ import annotations

import json

import numpy as np

from services.sim.engine import SimConfig, simulate
from services.sim.metrics import OK
from services.policy.planning import settle
from services.sim.scenario import (LIVE, RateShape, diurnal_shape, live_config, shape_arrivals, square_shape,
                                   step_windows, steps_summary, trace_arrivals, violation_ratio)

LOADGEN_SHAPES = ("square", "step", "constant")   # and "diurnal" with --low/--high


def add_arguments(one) -> None:
    """The ``run`` subcommand's flags for loadgen shapes, trace scaling and the live model."""
    one.add_argument("--spec", default=None, help="pipeline spec: its SLO (default: the profile's)")
    one.add_argument("--low", type=float, default=None, help="loadgen shapes: the low rate (req/s)")
    one.add_argument("--high", type=float, default=None, help="loadgen shapes: the high rate (req/s)")
    one.add_argument("--period", type=float, default=30.0, help="square / diurnal period (s, default 30)")
    one.add_argument("--duty", type=float, default=0.5, help="square: share of each period at --high")
    one.add_argument("--step-at", type=float, default=None, help="step: when the rate goes to --high (s)")
    one.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply arrival times by this")
    one.add_argument("--model", choices=("live", "ideal"), default=None,
                     help="live (the default for loadgen shapes and traces): front-door reports every --report-s, the controller every "
                          "--control-s, front-door time, plan delay, client deadlines, cold start; "
                          "ideal (the default for the reproduce shapes and --poisson): make reproduce's cluster")
    one.add_argument("--report-s", type=float, default=LIVE["report_s"])
    one.add_argument("--control-s", type=float, default=LIVE["control_period_s"])
    one.add_argument("--frontdoor-ms", type=float, default=LIVE["ingress_s"] * 1000,
                     help="per request, before routing (default %(default)g)")
    one.add_argument("--egress-ms", type=float, default=LIVE["egress_s"] * 1000,
                     help="per request, the answer's way back to the client (default %(default)g)")
    one.add_argument("--plan-delay-ms", type=float, default=LIVE["plan_delay_s"] * 1000)
    one.add_argument("--load-s", type=float, default=SimConfig.load_s,
                     help="model load time where the profile has none (default %(default)g)")
    one.add_argument("--cores", type=float, default=None,
                     help="cores the workers share (batches slow down when more run at once); default: no "
                          "contention. A profile's measured sharing table takes its place")
    one.add_argument("--workers-per-device", type=int, default=None,
                     help="with a sharing table in the profile: workers on one device (default: all on one)")
    one.add_argument("--warm-start", action="store_true", help="live model without the cold start")
    one.add_argument("--step-window-s", type=float, default=3.0)


def wants_loadgen_shape(a) -> bool:
    return a.shape in LOADGEN_SHAPES or (a.shape == "diurnal" and a.high is not None)


def loadgen_shape(a, error) -> RateShape:
    if a.high is None or (a.low is None and a.shape != "constant"):
        error(f"--shape {a.shape} needs --low and --high")
    if a.shape == "square":
        shape = square_shape(a.low, a.high, a.period, a.duty)
    elif a.shape == "diurnal":
        shape = diurnal_shape(a.low, a.high, a.period)
    elif a.shape == "step":
        shape = RateShape("step", rate=a.low, peak_rate=a.high, step_at_s=a.step_at)
    else:
        shape = RateShape("constant", rate=a.high)
    try:
        shape.validate()
    except ValueError as exc:
        error(str(exc))
    return shape


def config(a, slo_ms: float | None) -> SimConfig:
    base = SimConfig(n_workers=a.workers, seed=a.seed, hop_s=a.hop_ms / 1000.0, slo_ms=slo_ms, load_s=a.load_s,
                     cores=a.cores, workers_per_device=a.workers_per_device)
    if a.model == "ideal":
        return base
    return live_config(base, report_s=a.report_s, control_period_s=a.control_s,
                       ingress_s=a.frontdoor_ms / 1000.0, egress_s=a.egress_ms / 1000.0,
                       plan_delay_s=a.plan_delay_ms / 1000.0, cold_start=not a.warm_start)


def summarise(res, arrivals, window_s: float) -> dict:
    """What ``run`` prints: violations overall and after the steps, plans, active workers."""
    good = res.status == OK
    sw = step_windows(res.arrival_s, good, arrivals.steps, window_s)
    return {"arrivals": arrivals.describe, "requests": res.requests, "violation_ratio": violation_ratio(good),
            "after_steps": sw, "plan_versions": res.plans, "mean_active_workers": res.mean_active_workers,
            "min_active_workers": float(np.min(res.series["active"])) if res.series["active"].size else None,
            "effective_accuracy": res.effective_accuracy, "late": res.count(2), "dropped": res.count(3),
            "shed": res.count(4)}


def print_summary(d: dict) -> None:
    print(f"arrivals: {d['arrivals']}: {d['requests']} requests")
    print(f"violations: {100 * (d['violation_ratio'] or 0):.1f} % (late {d['late']}, dropped {d['dropped']}, "
          f"shed {d['shed']}); {steps_summary(d['after_steps'])}")
    print(f"plan versions: {d['plan_versions']}; active workers: mean {d['mean_active_workers']:.2f}, "
          f"min {d['min_active_workers']:g}; effective accuracy {d['effective_accuracy']:.4f}")
    print(json.dumps(d, indent=1, default=float))


def run_live(a, prof, policy, error) -> dict:
    """The new ``run`` path: loadgen shapes and trace replays."""
    slo_ms = None
    if a.spec:
        from services.common.spec import load_spec
        slo_ms = load_spec(a.spec).slo_ms
    if a.shape is not None:
        if a.duration is None:
            error(f"--shape {a.shape} needs --duration")
        arrivals = shape_arrivals(loadgen_shape(a, error), a.duration, a.seed)
    else:
        arrivals = trace_arrivals(a.trace, a.time_scale, a.rate_scale, a.seed, a.duration)
    if arrivals.times_s.size == 0:
        error("the arrivals are empty")
    if a.model == "live" and hasattr(policy, "planner"):
        settle(policy.planner)     # the controller's dwell, peak hold and off-peak headroom
    cfg = config(a, slo_ms)
    if hasattr(policy, "planner"):
        policy.planner.workers_per_device = cfg.workers_per_device   # the planner sees the devices the engine runs
    res = simulate(prof, arrivals.times_s, policy, cfg)
    d = summarise(res, arrivals, a.step_window_s)
    d["model"] = a.model
    print_summary(d)
    return d
