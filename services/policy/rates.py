"""Query rates per key (e.g. per (stage, upstream variant path)), as a router measures
them for MostAccurateFirst: counts folded every ``tick_s`` into an exponentially
weighted moving average with time constant ``tau_s`` (seconds, not ticks).

The router and the simulator both use :class:`RateMeter`: the router calls
``advance(clock())`` before it counts or reads, the simulator once per control tick.
"""
from __future__ import annotations

import math

# alpha = 0.5 per 1 s tick: the smoothing the simulator's results were measured with
# (docs/simulator.md); tau = 1 / ln 2 = 1.44 s.
RATE_TAU_S = 1.0 / math.log(2.0)


class RateMeter:
    def __init__(self, tau_s: float = RATE_TAU_S, tick_s: float = 1.0, start_s: float = 0.0) -> None:
        if tau_s <= 0 or tick_s <= 0:
            raise ValueError("tau_s and tick_s must be positive")
        self.tau_s = tau_s
        self.tick_s = tick_s
        self._counts: dict = {}
        self._rates: dict = {}
        self._last = start_s
        self._alpha = 1.0 - math.exp(-tick_s / tau_s)

    def count(self, key, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def rate(self, key) -> float | None:
        """The smoothed rate of ``key`` in queries/s; None before its first tick."""
        return self._rates.get(key)

    def advance(self, now: float) -> bool:
        """Fold whole ticks up to ``now``: the counts since the last fold become the
        rate of the first elapsed tick, each further elapsed tick folds a count of 0
        (the rate decays). Folding on a fixed grid makes a router that advances at
        arbitrary request times agree with the simulator that advances once per tick.
        Returns True when it folded."""
        n = int((now - self._last) // self.tick_s)
        if n <= 0:
            return False
        alpha = self._alpha
        counts = self._counts
        for key in counts.keys() | self._rates.keys():
            inst = counts.get(key, 0) / self.tick_s
            prev = self._rates.get(key)
            self._rates[key] = inst if prev is None else prev + alpha * (inst - prev)
        if n > 1:
            decay = (1.0 - alpha) ** min(n - 1, 1000)
            for key in self._rates:
                self._rates[key] *= decay
        self._counts = {}
        self._last += n * self.tick_s
        return True
