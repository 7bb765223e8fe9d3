"""One arrival shape, run the way a live cluster runs it: the arrivals, their steps, the
live model's settings, and what happened in the seconds after each step.

The arrivals come from the load generator's own schedule code
(``services.loadgen.schedule``: :func:`shape_schedule` for square waves, steps and diurnal
cycles, :func:`trace_schedule` for trace replays), so a simulated run and a live run with
the same parameters and seed get the same requests. ``python -m services.sim run`` and
``python -m services.tools.fidelity`` both build their runs here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from services.loadgen.schedule import RateShape, read_trace, shape_schedule, trace_schedule
from services.sim.engine import SimConfig

# What a live cluster on this kind of host adds to the ideal one (docs/simulator.md, "The
# live model"): the front doors report once a second and early when their arrivals jump
# (checked every 0.1 s), the controller's loop runs every 0.25 s (its --reconcile-s), a
# request spends ~10 ms in the front door before routing and ~5 ms on its way back, a plan
# reaches the services ~0.2 s after the tick that decided it (the solve on a busy host,
# then Redis), the cluster starts cold, and a parked worker frees its model 3 s after it
# parked (the worker's --linger-s) unless the plan names it as its standby.
LIVE = dict(report_s=1.0, report_phase_s=0.5, report_check_s=0.1, control_period_s=0.25, ingress_s=0.010,
            egress_s=0.005, plan_delay_s=0.2, cold_start=True, park_linger_s=3.0)
STEP_WINDOW_S = 3.0


def live_config(base: SimConfig = SimConfig(), **overrides) -> SimConfig:
    """``base`` with the live model's settings (``LIVE``), then ``overrides``."""
    return replace(base, **{**LIVE, **overrides})


@dataclass(frozen=True)
class Step:
    t_s: float
    before_qps: float
    after_qps: float

    @property
    def up(self) -> bool:
        return self.after_qps > self.before_qps


def shape_steps(shape: RateShape, duration_s: float) -> list[Step]:
    """The instants in ``[0, duration_s)`` where a piecewise-constant shape's rate jumps
    (square waves, steps); none for constant and diurnal shapes."""
    if shape.kind == "step":
        t = float(shape.step_at_s)
        return [Step(t, shape.rate, float(shape.peak_rate))] if 0 < t < duration_s else []
    if shape.kind != "square":
        return []
    period, out = float(shape.period_s), []
    k = 0
    while k * period < duration_s:
        up = k * period + (1.0 - shape.duty) * period
        for t in (k * period, up):
            if 0 < t < duration_s:
                before = float(shape.rate_at(t - 1e-9))
                after = float(shape.rate_at(t))
                if before != after:
                    out.append(Step(t, before, after))
        k += 1
    return out


@dataclass(frozen=True)
class Arrivals:
    """A run's requests (send times, seconds) and the steps of its rate."""

    times_s: np.ndarray
    steps: tuple[Step, ...]
    describe: str
    shape: RateShape | None = None
    duration_s: float | None = None


def shape_arrivals(shape: RateShape, duration_s: float, seed: int) -> Arrivals:
    times = np.array([a.t_s for a in shape_schedule(shape, duration_s, seed)], dtype=float)
    return Arrivals(times, tuple(shape_steps(shape, duration_s)), shape.describe(), shape, duration_s)


def trace_arrivals(path, time_scale: float, rate_scale: float, seed: int,
                   duration_s: float | None = None) -> Arrivals:
    sched = trace_schedule(read_trace(path), time_scale=time_scale, rate_scale=rate_scale, seed=seed,
                           duration_s=duration_s)
    times = np.array([a.t_s for a in sched], dtype=float)
    return Arrivals(times, (), f"trace {path} x{time_scale:g} in time, x{rate_scale:.4f} in rate, seed {seed}",
                    None, duration_s)


def step_windows(arrival_s: np.ndarray, good: np.ndarray, steps, window_s: float = STEP_WINDOW_S) -> dict:
    """Violations among the requests sent in the ``window_s`` seconds after each step.
    ``good``: per request, answered OK within its deadline. Windows that overlap the
    next step are cut there (a request belongs to one step). Returns the totals over the
    steps up and over all steps, and one entry per step."""
    t = np.asarray(arrival_s, dtype=float)
    good = np.asarray(good, dtype=bool)
    steps = sorted(steps, key=lambda s: s.t_s)
    per = []
    for i, s in enumerate(steps):
        end = s.t_s + window_s
        if i + 1 < len(steps):
            end = min(end, steps[i + 1].t_s)
        sel = (t >= s.t_s) & (t < end)
        n = int(sel.sum())
        per.append({"t_s": round(s.t_s, 3), "up": s.up, "requests": n, "violations": n - int(good[sel].sum())})

    def total(rows) -> dict:
        n = sum(r["requests"] for r in rows)
        v = sum(r["violations"] for r in rows)
        return {"requests": n, "violations": v, "violation_ratio": v / n if n else None}

    return {"window_s": window_s, "up": total([r for r in per if r["up"]]), "all": total(per), "steps": per}


def violation_ratio(good: np.ndarray) -> float | None:
    good = np.asarray(good, dtype=bool)
    return float(1.0 - good.mean()) if good.size else None


def within(real: float | None, sim: float | None, factor: float = 2.0, points: float = 0.01) -> bool | None:
    """The fidelity target: real and simulated violation ratios within ``factor`` of each
    other, or within ``points`` (0.01: one percentage point) of each other."""
    if real is None or sim is None:
        return None
    if abs(real - sim) <= points + 1e-12:
        return True
    lo, hi = sorted((real, sim))
    return lo > 0 and hi / lo <= factor + 1e-12


def square_shape(low: float, high: float, period_s: float, duty: float = 0.5) -> RateShape:
    return RateShape("square", rate=low, peak_rate=high, period_s=period_s, duty=duty)


def diurnal_shape(low: float, high: float, period_s: float) -> RateShape:
    return RateShape("diurnal", rate=low, peak_rate=high, period_s=period_s)


def rate_scale_for_peak(path, time_scale: float, window_s: float, peak_qps: float) -> float:
    """The rate scale whose busiest ``window_s`` window (after time compression) offers
    ``peak_qps`` on average before replication noise (``make evaluate``'s recipe)."""
    entries = read_trace(path)
    t = np.array([e.arrival_ms for e in entries]) / 1000.0
    w = window_s / time_scale
    counts, _ = np.histogram(t, bins=np.arange(0.0, t.max() + w, w))
    return peak_qps * time_scale / (float(counts.max()) / w)


def steps_summary(sw: dict) -> str:
    up = sw["up"]
    if not sw["steps"]:
        return "no steps"
    pct = "n/a" if up["violation_ratio"] is None else f"{100 * up['violation_ratio']:.1f} %"
    return (f"{up['violations']}/{up['requests']} = {pct} in the first {sw['window_s']:g} s after "
            f"{sum(1 for s in sw['steps'] if s['up'])} step(s) up")


