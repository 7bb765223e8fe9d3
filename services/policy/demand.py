"""Demand estimation from the front doors' request counters.

Each front door publishes its cumulative count of received requests (admitted or
not) with a timestamp, about once a second. The estimator measures each front door's
rate over a sliding window of ``window_s`` seconds (one-second Poisson counts are too
noisy to plan on) and smooths the sum with an exponentially weighted moving average
whose time constant is ``tau_s`` (seconds, not samples: the loop period may vary)
while the windowed rate is below the estimate and ``tau_up_s`` while it is above: a
rise is followed faster than a fall, because too little capacity costs SLO misses at
once and too much only accuracy or workers. (Measured in the simulator on the
traffic-analysis comparison traces, before rerouting at the first stage, 1 s vs 3 s
up: 5.1 % vs 6.3 % violations at high load, 2.7 % vs 4.2 % at low load, about 0.3 more
active workers; docs/simulator.md, Known limits.)
With ``tau_up_s == tau_s`` the average is symmetric and a steady demand is estimated
without bias; with a faster rise, a noisy steady demand is slightly overestimated.

A step up is not averaged in: when the requests of the last ``rise_window_s`` (or twice
that) are implausibly many for a Poisson process at the rate *before* them (more than
``rise_sigmas`` standard deviations above, and at least ``rise_min_count``), that recent
rate is the front door's rate and the estimate jumps to it at once (:meth:`rate`). Front
doors report early when their arrivals jump (:func:`report_due`), so a step is seen
about a second after it began, not after the 5 s window and the average caught up.
"""
from __future__ import annotations

import math
from collections import deque


def jumped(count: float, expected: float, sigmas: float, min_count: float) -> bool:
    """``count`` arrivals where a Poisson process was ``expected`` to bring that many on
    average: more than ``sigmas`` standard deviations above, and at least ``min_count``."""
    return count >= min_count and count > expected + sigmas * math.sqrt(max(expected, 1.0))


def report_due(now: float, last_ts: float, arrived: float, rate: float, period_s: float,
               min_gap_s: float = 0.1, sigmas: float = 3.0, min_count: int = 3) -> bool:
    """A front door's demand report is due: ``period_s`` since the last one (at
    ``last_ts``), or, at least ``min_gap_s`` after it, the ``arrived`` requests since then
    are implausibly many for its recent ``rate`` (req/s), i.e. demand jumped (:func:`jumped`).
    An early report costs one more Redis write; the estimator decides whether it is a step."""
    since = now - last_ts
    if since >= period_s:
        return True
    return since >= min_gap_s and jumped(arrived, rate * since, sigmas, min_count)


class DemandReporter:
    """When a front door publishes its request counters: once a ``period_s``, or early when
    the arrivals since its last report are implausibly many for its rate over the last
    ``history_s`` of reports (:func:`report_due`). Pure: the front door's reporter loop
    and the simulator's live model both ask :meth:`due` every ``check_s`` or so."""

    def __init__(self, period_s: float = 1.0, history_s: float = 5.0) -> None:
        self.period_s = period_s
        self.history_s = history_s
        self.reports: deque[tuple[float, float]] = deque()   # (time, received) of recent reports
        self.last_ts = -math.inf
        self.last_n = 0.0

    def due(self, now: float, received: float) -> bool:
        """Whether to publish ``received`` now; a True answer counts as published."""
        reports = self.reports
        while len(reports) > 1 and reports[0][0] < now - self.history_s:
            reports.popleft()
        rate = ((reports[-1][1] - reports[0][1]) / max(reports[-1][0] - reports[0][0], self.period_s)
                if reports else 0.0)
        if not report_due(now, self.last_ts, received - self.last_n, rate, self.period_s):
            return False
        self.last_ts, self.last_n = now, received
        reports.append((now, received))
        return True


class DemandEstimator:
    def __init__(self, tau_s: float = 3.0, window_s: float = 5.0, stale_s: float = 10.0,
                 tau_up_s: float | None = 1.0, rise_window_s: float | None = 1.0, rise_sigmas: float = 4.5,
                 rise_min_count: int = 7) -> None:
        self.tau_s = tau_s
        self.rise_min_count = rise_min_count
        self.rise_window_s = rise_window_s
        self.rise_sigmas = rise_sigmas
        self.tau_up_s = tau_s if tau_up_s is None else tau_up_s
        self.window_s = window_s
        self.stale_s = stale_s
        self.samples: dict[str, deque[tuple[float, float]]] = {}
        self.estimate = 0.0
        self.jumps = 0                   # updates that jumped to a step's rate
        self._last_update: float | None = None

    def observe(self, source: str, count: float, ts: float) -> None:
        """A front door's cumulative request ``count`` at its clock ``ts`` (seconds)."""
        hist = self.samples.get(source)
        if hist is None or count < hist[-1][1]:   # new, or restarted (counter reset)
            self.samples[source] = deque([(ts, count)])
            return
        if ts <= hist[-1][0]:
            return
        hist.append((ts, count))
        while len(hist) > 2 and hist[1][0] <= ts - self.window_s:
            hist.popleft()

    @property
    def ready(self) -> bool:
        """True once a front door's counters span the whole window (a rate over one or
        two seconds of Poisson arrivals is too noisy to plan on; a restarted controller
        waits for this before it re-plans)."""
        return any(h[-1][0] - h[0][0] >= self.window_s - 1e-9 for h in self.samples.values() if len(h) >= 2)

    def rate(self, source: str) -> float:
        """The front door's rate: over the window, or over its last ``rise_window_s`` (or
        twice that) when those requests are a step up (their count is implausible for the
        rate before them; the window's own rate would include them)."""
        return self._rate(source)[0]

    def _rate(self, source: str) -> tuple[float, bool]:
        """:meth:`rate`, and whether it is a step's rate (not the window's)."""
        hist = self.samples[source]
        if len(hist) < 2:
            return 0.0, False
        (t0, c0), (t1, c1) = hist[0], hist[-1]
        windowed = (c1 - c0) / (t1 - t0)
        if not self.rise_window_s:
            return windowed, False
        best = None
        for w in (self.rise_window_s, 2.0 * self.rise_window_s):
            ta, ca = next(((t, c) for t, c in reversed(hist) if t <= t1 - w + 1e-9), hist[0])
            if t1 - ta <= 0:
                continue
            # the rate before these requests; with no history before them, the window's
            # (a rate can only be a step against what came before it)
            before = (ca - c0) / (ta - t0) if ta - t0 >= self.rise_window_s - 1e-9 else windowed
            if jumped(c1 - ca, before * (t1 - ta), self.rise_sigmas, self.rise_min_count):
                recent = (c1 - ca) / (t1 - ta)
                best = recent if best is None else max(best, recent)
        if best is None or best <= windowed:
            return windowed, False
        return best, True

    def update(self, now: float) -> float:
        """Fold the current rates into the estimate; returns it (requests/s). A step up
        (a front door's recent requests implausible for its rate before) sets the
        estimate to at least the sum at once; otherwise the moving average follows."""
        for name in [n for n, h in self.samples.items() if now - h[-1][0] > self.stale_s]:
            del self.samples[name]           # a front door that stopped reporting
        rates = [self._rate(n) for n in self.samples]
        instant = sum(r for r, _ in rates)
        jump = any(j for _, j in rates)
        if self._last_update is None:
            self.estimate = instant
        elif jump and instant > self.estimate:
            self.estimate = instant
            self.jumps += 1
        else:
            dt = max(0.0, now - self._last_update)
            tau = self.tau_up_s if instant > self.estimate else self.tau_s
            alpha = 1.0 - math.exp(-dt / tau) if tau > 0 else 1.0
            self.estimate += alpha * (instant - self.estimate)
        self._last_update = now
        return self.estimate
