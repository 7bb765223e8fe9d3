"""Admission control: a token bucket at the plan's admission rate. Requests beyond it
are shed explicitly (RESOURCE_EXHAUSTED) instead of queueing into certain lateness."""
from __future__ import annotations


class TokenBucket:
    def __init__(self, rate_per_s: float | None, burst_s: float = 1.0) -> None:
        self.set_rate(rate_per_s, burst_s)
        self._last: float | None = None

    def set_rate(self, rate_per_s: float | None, burst_s: float = 1.0) -> None:
        self.rate = rate_per_s
        self.capacity = None if rate_per_s is None else max(1.0, rate_per_s * burst_s)
        self.tokens = self.capacity or 0.0

    def admit(self, now: float) -> bool:
        """True if a request arriving at ``now`` (seconds) is admitted."""
        if self.rate is None:
            return True
        if self._last is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
