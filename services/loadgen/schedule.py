"""Arrival schedules for the load generator: pure, seeded, socket-free.

An arrival schedule is a sorted list of :class:`Arrival` (offset in seconds from the
start of the run). Two sources:

* :func:`poisson_schedule`: open-loop Poisson arrivals at a fixed rate;
* :func:`parse_trace` + :func:`trace_schedule`: replay of an ``arrival_ms,qos,deadline_ms``
  trace (the Twitter-derived traces in ``traces/``), scaled in rate and in time.

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
