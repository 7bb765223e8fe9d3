"""Arrival processes for the simulator: sorted numpy arrays of arrival times (seconds).

Trace replays reuse the load generator's parser and the brief's rate-scaling recipe
(``services.loadgen.schedule``), so the simulator and a live replay see the same
requests.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from services.loadgen.schedule import read_trace, scale_rate_ms


def trace_arrivals(path: str | Path, rate_scale: float = 1.0, seed: int = 0,
                   time_scale: float = 1.0) -> np.ndarray:
    """A Twitter-derived trace, rate-scaled by the brief's recipe (milliseconds, file
    order, ``int()`` times), then time-scaled."""
    entries = read_trace(path)
    if rate_scale == 1.0:
        ms = np.sort(np.array([e.arrival_ms for e in entries], dtype=float))
    else:
        ms = np.array([t for t, _ in scale_rate_ms([e.arrival_ms for e in entries], rate_scale, seed)],
                      dtype=float)
    return ms * (time_scale / 1000.0)


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * duration_s)
    return np.sort(rng.uniform(0.0, duration_s, size=n))


def _inhomogeneous(rate_fn, peak: float, duration_s: float, seed: int) -> np.ndarray:
    """Thinning of a Poisson process at ``peak`` by ``rate_fn(t) / peak``."""
    rng = np.random.default_rng(seed)
    t = poisson_arrivals(peak, duration_s, int(rng.integers(1 << 31)))
    keep = rng.random(t.size) < rate_fn(t) / peak
    return t[keep]


def bursty_arrivals(base_rate: float, burst_rate: float, duration_s: float, seed: int,
                    period_s: float = 60.0, burst_s: float = 15.0) -> np.ndarray:
    """Poisson at ``base_rate`` with a burst to ``burst_rate`` for ``burst_s`` every ``period_s``."""
    peak = max(base_rate, burst_rate)
    return _inhomogeneous(lambda t: np.where((t % period_s) < burst_s, burst_rate, base_rate),
                          peak, duration_s, seed)


def diurnal_arrivals(low_rate: float, high_rate: float, duration_s: float, seed: int,
                     period_s: float | None = None) -> np.ndarray:
    """Sinusoidal rate between ``low_rate`` and ``high_rate`` (one period over the run by default)."""
    period = period_s or duration_s
    mid, amp = (high_rate + low_rate) / 2, (high_rate - low_rate) / 2
    return _inhomogeneous(lambda t: mid - amp * np.cos(2 * math.pi * t / period),
                          max(high_rate, low_rate), duration_s, seed)


def peak_rate(arrivals_s: np.ndarray, window_s: float = 1.0) -> float:
    """Highest number of arrivals in any ``window_s`` bin, per second."""
    if arrivals_s.size == 0:
        return 0.0
    counts = np.bincount((arrivals_s // window_s).astype(np.int64))
    return float(counts.max()) / window_s


def shape_arrivals(shape, duration_s: float, seed: int) -> np.ndarray:
    """Arrivals whose rate follows a load generator ``RateShape`` (constant, step, square,
    diurnal): the loadgen's own :func:`~services.loadgen.schedule.shape_schedule`, so a
    simulated square wave and a live one are the same requests."""
    from services.loadgen.schedule import shape_schedule
    return np.array([a.t_s for a in shape_schedule(shape, duration_s, seed)], dtype=float)


def heavy_tail_bursts(base_rate: float, peak_rate: float, duration_s: float, seed: int,
                      mean_gap_s: float = 30.0, mean_len_s: float = 8.0, alpha: float = 1.2) -> np.ndarray:
    """Poisson arrivals at ``base_rate`` with bursts on top: burst starts are a Poisson
    process (mean gap ``mean_gap_s``), lengths exponential (mean ``mean_len_s``), and each
    burst multiplies the base rate by a Pareto(``alpha``) factor, heavy-tailed, capped so
    the rate never exceeds ``peak_rate``. The largest burst of the run is raised to the
    peak, so every seed reaches the same peak rate. Overlapping bursts take the larger."""
    rng = np.random.default_rng([seed, 7])
    starts, t = [], 0.0
    while True:
        t += rng.exponential(mean_gap_s)
        if t >= duration_s:
            break
        starts.append(t)
    lens = rng.exponential(mean_len_s, size=len(starts))
    cap = peak_rate / base_rate
    mult = np.minimum(1.5 * (rng.pareto(alpha, size=len(starts)) + 1.0), cap)
    if len(starts):
        top = int(np.argmax(mult))
        mult[top] = cap
        lens[top] = max(lens[top], 3.0)    # long enough to show in one-second counts
    bursts = [(s, s + max(ln, 1.0), m) for s, ln, m in zip(starts, lens, mult)]

    def rate(ts: np.ndarray) -> np.ndarray:
        r = np.full_like(ts, base_rate, dtype=float)
        for s, e, m in bursts:
            inside = (ts >= s) & (ts < e)
            r[inside] = np.maximum(r[inside], base_rate * m)
        return r

    return _inhomogeneous(rate, peak_rate, duration_s, seed)
