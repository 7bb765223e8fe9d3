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
"""
from __future__ import annotations

import math
from collections import deque


class DemandEstimator:
    def __init__(self, tau_s: float = 3.0, window_s: float = 5.0, stale_s: float = 10.0,
                 tau_up_s: float | None = 1.0, rise_window_s: float | None = 1.0, rise_sigmas: float = 3.0,
                 rise_min_count: int = 10) -> None:
        self.tau_s = tau_s
        self.rise_min_count = rise_min_count
        self.rise_window_s = rise_window_s
        self.rise_sigmas = rise_sigmas
        self.tau_up_s = tau_s if tau_up_s is None else tau_up_s
        self.window_s = window_s
        self.stale_s = stale_s
        self.samples: dict[str, deque[tuple[float, float]]] = {}
        self.estimate = 0.0
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
        hist = self.samples[source]
        if len(hist) < 2:
            return 0.0
        (t0, c0), (t1, c1) = hist[0], hist[-1]
        windowed = (c1 - c0) / (t1 - t0)
        if not self.rise_window_s:
            return windowed
        # a step up shows in the last second long before the window's mean follows it:
        # take the recent rate when its count is implausible for a Poisson process at the
        # windowed rate (more than ``rise_sigmas`` above it)
        ta, ca = next(((t, c) for t, c in reversed(hist) if t <= t1 - self.rise_window_s + 1e-9), hist[0])
        if t1 - ta <= 0:
            return windowed
        expected = windowed * (t1 - ta)
        # at a few requests a second a Poisson clump looks like a step (4 arrivals after
        # none); only a rise of at least ``rise_min_count`` requests counts
        if (c1 - ca) >= self.rise_min_count and \
                (c1 - ca) > expected + self.rise_sigmas * math.sqrt(max(expected, 1.0)):
            return (c1 - ca) / (t1 - ta)
        return windowed

    def update(self, now: float) -> float:
        """Fold the current windowed rate into the estimate; returns it (requests/s)."""
        for name in [n for n, h in self.samples.items() if now - h[-1][0] > self.stale_s]:
            del self.samples[name]           # a front door that stopped reporting
        instant = sum(self.rate(n) for n in self.samples)
        if self._last_update is None:
            self.estimate = instant
        else:
            dt = max(0.0, now - self._last_update)
            tau = self.tau_up_s if instant > self.estimate else self.tau_s
            alpha = 1.0 - math.exp(-dt / tau) if tau > 0 else 1.0
            self.estimate += alpha * (instant - self.estimate)
        self._last_update = now
        return self.estimate
