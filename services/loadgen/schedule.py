"""Arrival schedules for the load generator: pure, seeded, socket-free.

An arrival schedule is a sorted list of :class:`Arrival` (offset in seconds from the
start of the run). Two sources:

* :func:`poisson_schedule`: open-loop Poisson arrivals at a fixed rate;
* :func:`parse_trace` + :func:`trace_schedule`: replay of an ``arrival_ms,qos,deadline_ms``
  trace (the Twitter-derived traces in ``traces/``), scaled in rate and in time;
* :func:`shape_schedule`: Poisson arrivals whose rate follows a synthetic
  :class:`RateShape` (constant, step, on/off square wave, diurnal sine), drawn by
  thinning: candidates at the shape's peak rate, each kept with probability
  ``rate(t) / peak`` (seeded, so the same seed gives the same schedule).

Rate scaling follows the project's published recipe (design brief, section 5) so the
scaled traces match the simulator's inputs exactly: for each arrival ``t`` in file order
draw ``k = floor(s) + (rng.random() < s - floor(s))``, emit ``int(t)``, then for
``j = 1..k-1`` emit ``int(t + rng.random() * 20)`` (ms); sort. Time scaling then multiplies
every arrival time (``time_scale = 0.1`` replays a 290 s trace in 29 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Replicas created by rate scaling land within this many ms of their original.
REPLICA_JITTER_MS = 20.0


@dataclass(frozen=True)
class Arrival:
    """One request to send: ``t_s`` seconds after the start; ``deadline_ms`` is the
    trace's relative deadline (None for Poisson arrivals); ``qos`` the trace's class."""

    t_s: float
    deadline_ms: float | None = None
    qos: int = 0


@dataclass(frozen=True)
class TraceEntry:
    arrival_ms: float
    qos: int
    deadline_ms: float


class TraceError(ValueError):
    """A trace line is malformed; the message names the source and line."""


def poisson_schedule(rate: float, duration_s: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at ``rate`` per second over ``[0, duration_s)``.

    Deterministic for a seed: exponential inter-arrival gaps with mean ``1 / rate`` from
    ``numpy.random.default_rng(seed)``.
    """
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number, got {rate}")
    if duration_s <= 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s}")
    rng = np.random.default_rng(seed)
    chunk = max(16, int(rate * duration_s * 1.2) + 16)
    parts: list[np.ndarray] = []
    t0 = 0.0
    while True:
        times = t0 + np.cumsum(rng.exponential(1.0 / rate, size=chunk))
        inside = times[times < duration_s]
        parts.append(inside)
        if inside.size < times.size:
            break
        t0 = float(times[-1])
    return [Arrival(float(t)) for t in np.concatenate(parts)]


def parse_trace(lines: Iterable[str], source: str = "<trace>") -> list[TraceEntry]:
    """Parse ``arrival_ms,qos,deadline_ms`` lines (blank lines and ``#`` comments skipped).

    Arrival times must be non-negative; deadlines positive. Order is preserved (the
    rate-scaling recipe depends on file order)."""
    entries: list[TraceEntry] = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise TraceError(
                f"{source}:{lineno}: expected 'arrival_ms,qos,deadline_ms', got {text!r}")
        try:
            arrival, qos, deadline = float(parts[0]), int(parts[1]), float(parts[2])
        except ValueError:
            raise TraceError(f"{source}:{lineno}: not numbers: {text!r}") from None
        if not (math.isfinite(arrival) and arrival >= 0):
            raise TraceError(f"{source}:{lineno}: arrival_ms must be >= 0, got {parts[0]}")
        if not (math.isfinite(deadline) and deadline > 0):
            raise TraceError(f"{source}:{lineno}: deadline_ms must be > 0, got {parts[2]}")
        entries.append(TraceEntry(arrival, qos, deadline))
    return entries


def read_trace(path: str | Path) -> list[TraceEntry]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        return parse_trace(f, source=str(path))


def scale_rate_ms(arrivals_ms: Sequence[float], rate_scale: float, seed: int) -> list[tuple[float, int]]:
    """The brief's replication recipe. Returns sorted ``(time_ms, source_index)`` pairs;
    ``source_index`` points at the trace entry each replica came from."""
    if rate_scale <= 0 or not math.isfinite(rate_scale):
        raise ValueError(f"rate_scale must be a positive number, got {rate_scale}")
    rng = np.random.default_rng(seed)
    whole = math.floor(rate_scale)
    frac = rate_scale - whole
    out: list[tuple[float, int]] = []
    for i, t in enumerate(arrivals_ms):
        k = whole + (1 if rng.random() < frac else 0)
        if k == 0:
            continue
        out.append((float(int(t)), i))  # int(): the recipe emits whole milliseconds
        for _ in range(1, k):
            out.append((float(int(t + rng.random() * REPLICA_JITTER_MS)), i))
    out.sort()
    return out


def trace_schedule(entries: Sequence[TraceEntry], *, time_scale: float = 1.0,
                   rate_scale: float = 1.0, seed: int = 0,
                   duration_s: float | None = None) -> list[Arrival]:
    """Scale a parsed trace into a schedule: rate first (in trace milliseconds, as the
    recipe is written), then time. ``duration_s`` (after scaling) truncates the replay.
    The relative deadlines are kept as they are (time scaling does not shrink them)."""
    if time_scale <= 0 or not math.isfinite(time_scale):
        raise ValueError(f"time_scale must be a positive number, got {time_scale}")
    if rate_scale == 1.0:
        pairs = sorted((e.arrival_ms, i) for i, e in enumerate(entries))
    else:
        pairs = scale_rate_ms([e.arrival_ms for e in entries], rate_scale, seed)
    schedule: list[Arrival] = []
    for t_ms, i in pairs:
        t_s = t_ms * time_scale / 1000.0
        if duration_s is not None and t_s >= duration_s:
            break
        e = entries[i]
        schedule.append(Arrival(t_s, e.deadline_ms, e.qos))
    return schedule


SHAPES = ("constant", "step", "square", "diurnal")


@dataclass(frozen=True)
class RateShape:
    """A request rate that changes over time (requests per second at ``t`` seconds).

    * ``constant``: ``rate`` throughout;
    * ``step``: ``rate`` before ``step_at_s``, ``peak_rate`` from then on;
    * ``square``: on/off square wave of period ``period_s``: ``rate`` for the first
      ``1 - duty`` of each period, ``peak_rate`` for the remaining ``duty`` (``rate = 0``
      gives a true on/off load);
    * ``diurnal``: a sine from ``rate`` (at t = 0) up to ``peak_rate`` (at ``period_s / 2``)
      and back, ``rate + (peak_rate - rate) * (1 - cos(2 pi t / period_s)) / 2``.
    """

    kind: str = "constant"
    rate: float = 1.0
    peak_rate: float | None = None
    period_s: float | None = None
    step_at_s: float | None = None
    duty: float = 0.5

    def validate(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; choose one of {', '.join(SHAPES)}")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be >= 0, got {self.rate}")
        if self.kind == "constant":
            if self.rate <= 0:
                raise ValueError(f"a constant shape needs a rate > 0, got {self.rate}")
            return
        if self.peak_rate is None or not (math.isfinite(self.peak_rate) and self.peak_rate > 0):
            raise ValueError(f"shape {self.kind!r} needs a peak rate > 0, got {self.peak_rate}")
        if self.kind == "step":
            if self.step_at_s is None or not (math.isfinite(self.step_at_s) and self.step_at_s >= 0):
                raise ValueError(f"shape 'step' needs a step time >= 0 s, got {self.step_at_s}")
        else:
            if self.period_s is None or not (math.isfinite(self.period_s) and self.period_s > 0):
                raise ValueError(f"shape {self.kind!r} needs a period > 0 s, got {self.period_s}")
        if self.kind == "square" and not 0 < self.duty < 1:
            raise ValueError(f"duty must be between 0 and 1 (exclusive), got {self.duty}")

    @property
    def max_rate(self) -> float:
        return self.rate if self.kind == "constant" else max(self.rate, float(self.peak_rate))

    def rate_at(self, t: np.ndarray | float) -> np.ndarray:
        """The rate (requests/s) at time(s) ``t`` seconds from the start."""
        t = np.asarray(t, dtype=float)
        if self.kind == "constant":
            return np.full_like(t, self.rate)
        peak = float(self.peak_rate)
        if self.kind == "step":
            return np.where(t < float(self.step_at_s), self.rate, peak)
        phase = np.mod(t, float(self.period_s)) / float(self.period_s)
        if self.kind == "square":
            return np.where(phase < 1.0 - self.duty, self.rate, peak)
        return self.rate + (peak - self.rate) * (1.0 - np.cos(2.0 * np.pi * phase)) / 2.0

    def expected_count(self, t0: float, t1: float, steps: int = 20_000) -> float:
        """The expected number of arrivals in ``[t0, t1)`` (the rate's integral)."""
        if t1 <= t0:
            return 0.0
        if self.kind == "diurnal":
            edges = np.linspace(t0, t1, steps + 1)
            mids = (edges[:-1] + edges[1:]) / 2.0
            return float(self.rate_at(mids).sum() * (t1 - t0) / steps)
        # piecewise constant: integrate exactly over its breakpoints
        points = {t0, t1}
        if self.kind == "step" and t0 < float(self.step_at_s) < t1:
            points.add(float(self.step_at_s))
        if self.kind == "square":
            period = float(self.period_s)
            k = math.floor(t0 / period)
            while k * period < t1:
                for b in (k * period, k * period + (1.0 - self.duty) * period):
                    if t0 < b < t1:
                        points.add(b)
                k += 1
        edges = sorted(points)
        return float(sum(float(self.rate_at((a + b) / 2.0)) * (b - a)
                         for a, b in zip(edges[:-1], edges[1:])))

    def describe(self) -> str:
        if self.kind == "constant":
            return f"constant {self.rate:g}/s"
        if self.kind == "step":
            return f"step {self.rate:g}/s -> {self.peak_rate:g}/s at {self.step_at_s:g} s"
        if self.kind == "square":
            return (f"square {self.rate:g}/s <-> {self.peak_rate:g}/s, period {self.period_s:g} s, "
                    f"duty {self.duty:g}")
        return f"diurnal {self.rate:g}/s .. {self.peak_rate:g}/s, period {self.period_s:g} s"


def shape_schedule(shape: RateShape, duration_s: float, seed: int) -> list[Arrival]:
    """Poisson arrivals over ``[0, duration_s)`` whose rate follows ``shape``.

    ``constant`` is exactly :func:`poisson_schedule`. The others thin a Poisson process at
    the shape's peak rate: a candidate at ``t`` is kept when a uniform draw is below
    ``rate(t) / peak`` (Lewis and Shedler), which gives an inhomogeneous Poisson process
    with the shape's rate. Deterministic for a seed."""
    shape.validate()
    if duration_s <= 0 or not math.isfinite(duration_s):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s}")
    if shape.kind == "constant":
        return poisson_schedule(shape.rate, duration_s, seed)
    top = shape.max_rate
    candidates = np.array([a.t_s for a in poisson_schedule(top, duration_s, seed)])
    if candidates.size == 0:
        return []
    keep = np.random.default_rng([seed, 1]).random(candidates.size) * top < shape.rate_at(candidates)
    return [Arrival(float(t)) for t in candidates[keep]]
