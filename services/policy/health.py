"""Worker health, as a router sees it, and a worker stuck in a batch, as the controller
sees it. Pure: time is passed in (``now``), nothing here sleeps or calls out.

A router tracks, per worker, its calls in flight with their expected end (from the
worker's learnt batch time or the plan's latency figures), and a circuit breaker fed by
the calls' outcomes:

- *closed*: traffic flows. ``failures_to_open`` consecutive failures (UNAVAILABLE, a
  connection error, a call abandoned past its expected end + margin) open it;
- *open*: no new traffic while another replica is usable; after ``cooldown_s`` it is
  *half-open*;
- *half-open*: the next call is a probe (others keep away while it runs); its success
  closes the breaker, its failure opens it again for twice the cool-down (at most
  ``max_cooldown_s``). Any successful answer closes the breaker.

A worker whose oldest call in flight is past its expected end + ``suspect_after`` x margin
is *suspect*: it gets no new traffic while another replica is usable, breaker or not (a
hung process answers nothing, so no failure arrives to open the breaker until the call
is abandoned, at its expected end + the whole margin).

The guarantee callers rely on: avoiding a worker never leaves a group without a worker
(``alternative`` returns None when no other replica is usable, and the caller then keeps
the plan's choice).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Sequence

from services.policy.routing import pick_weighted


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class HealthConfig:
    failures_to_open: int = 2     # consecutive failed calls that open a worker's breaker
    cooldown_s: float = 1.0       # open -> half-open (a probe), doubled after a failed probe
    max_cooldown_s: float = 8.0
    margin_s: float = 0.25        # a call is late past expected end + max(margin_s,
    margin_factor: float = 2.0    # margin_factor x its expected duration)
    suspect_after: float = 0.5    # a worker is suspect once a call is this fraction of its margin late


@dataclass
class _Call:
    worker_id: str
    expected_end: float           # when it should be answered
    suspect_at: float             # expected_end + suspect_after x margin: the worker is suspect
    probe: bool = False


@dataclass
class _Worker:
    calls: dict[int, _Call] = field(default_factory=dict)
    failures: int = 0
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    cooldown_s: float = 0.0
    probing: bool = False


@dataclass(frozen=True)
class Candidate:
    """A replica a group may go to instead: its worker id, variant and routing weight."""
    worker_id: str
    variant: str
    weight: float = 0.0


class WorkerHealth:
    """Per-worker calls in flight and circuit breakers of one router (module docstring)."""

    def __init__(self, config: HealthConfig = HealthConfig()) -> None:
        self.config = config
        self._workers: dict[str, _Worker] = {}
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)

    def margin_s(self, expected_s: float) -> float:
        """How far past its expected end a call may run before it counts as late."""
        return max(self.config.margin_s, self.config.margin_factor * max(0.0, expected_s))

    def _worker(self, wid: str) -> _Worker:
        w = self._workers.get(wid)
        if w is None:
            w = self._workers[wid] = _Worker(cooldown_s=self.config.cooldown_s)
        return w

    def state(self, wid: str, now: float) -> BreakerState:
        w = self._workers.get(wid)
        if w is None:
            return BreakerState.CLOSED
        if w.state is BreakerState.OPEN and now - w.opened_at >= w.cooldown_s:
            w.state = BreakerState.HALF_OPEN
            w.probing = False
        return w.state

    def suspect(self, wid: str, now: float) -> bool:
        """The worker's oldest call in flight is past its expected end + ``suspect_after`` x margin."""
        w = self._workers.get(wid)
        return w is not None and any(now > c.suspect_at for c in w.calls.values())

    def usable(self, wid: str, now: float) -> bool:
        """May new traffic go to ``wid`` (closed, or half-open with no probe out yet, and
        not suspect)?"""
        state = self.state(wid, now)
        if state is BreakerState.OPEN:
            return False
        if state is BreakerState.HALF_OPEN and self._workers[wid].probing:
            return False
        return not self.suspect(wid, now)

    def call_started(self, wid: str, now: float, expected_s: float) -> int:
        """A call to ``wid`` expected to take ``expected_s``; returns its token. The
        first call to a half-open worker is its probe."""
        w = self._worker(wid)
        probe = self.state(wid, now) is BreakerState.HALF_OPEN and not w.probing
        if probe:
            w.probing = True
        token = next(self._ids)
        end = now + max(0.0, expected_s)
        call = _Call(wid, end, end + self.config.suspect_after * self.margin_s(expected_s), probe)
        w.calls[token] = call
        self._calls[token] = call
        return token

    def call_ended(self, token: int, now: float, failed: bool | None) -> BreakerState | None:
        """A call's outcome: ``failed`` True for UNAVAILABLE, a connection error, or a call
        abandoned late; False for any answer; None when nothing is known (the caller was
        cancelled): the call is only forgotten. Returns the breaker's new state when this
        changed it, else None."""
        call = self._calls.pop(token, None)
        if call is None:
            return None
        w = self._workers.get(call.worker_id)
        if w is None:          # forgotten (left the plan) while the call ran
            return None
        w.calls.pop(token, None)
        before = self.state(call.worker_id, now)
        if call.probe:
            w.probing = False
        if failed is None:
            return None
        if not failed:
            w.failures = 0
            w.cooldown_s = self.config.cooldown_s
            w.state = BreakerState.CLOSED
        else:
            w.failures += 1
            if before is BreakerState.HALF_OPEN and call.probe:
                w.cooldown_s = min(self.config.max_cooldown_s, w.cooldown_s * 2)
                w.state, w.opened_at = BreakerState.OPEN, now
            elif before is BreakerState.CLOSED and w.failures >= self.config.failures_to_open:
                w.state, w.opened_at = BreakerState.OPEN, now
        return w.state if w.state is not before else None

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of workers not in ``keep`` (they left the plan)."""
        keep = set(keep)
        for wid in [w for w in self._workers if w not in keep]:
            for token in self._workers.pop(wid).calls:
                self._calls.pop(token, None)

    def snapshot(self, now: float) -> dict[str, dict]:
        """Each known worker's breaker state, consecutive failures, calls in flight."""
        return {wid: {"state": self.state(wid, now).value, "failures": w.failures, "in_flight": len(w.calls),
                      "suspect": self.suspect(wid, now)} for wid, w in sorted(self._workers.items())}


def alternative(variant: str, candidates: Sequence[Candidate], usable: Callable[[str], bool],
                u: Callable[[], float]) -> str | None:
    """Another replica for a group whose worker (running ``variant``) is avoided: a usable
    candidate of the same variant, else of another variant of the task; within each, by
    routing weight (``u()`` in [0, 1), drawn only then) when any has one, else the first
    listed. None when no candidate is usable."""
    ok = [c for c in candidates if usable(c.worker_id)]
    for group in ([c for c in ok if c.variant == variant], [c for c in ok if c.variant != variant]):
        weighted = {c.worker_id: c.weight for c in group if c.weight > 0}
        if weighted:
            return pick_weighted(weighted, u())
        if group:
            return group[0].worker_id
    return None


# A worker whose running batch has run this many times its expected time, and at least
# STUCK_FLOOR_S, is stuck (a model call that does not return): the controller plans
# without it, as if it were lost, until its heartbeats show the batch ended.
STUCK_FACTOR = 10.0
STUCK_FLOOR_S = 2.0


def batch_stuck(running_s: float, expected_s: float, factor: float = STUCK_FACTOR,
                floor_s: float = STUCK_FLOOR_S) -> bool:
    """Has a batch that has run ``running_s`` (expected: ``expected_s``) hung?"""
    return running_s > max(factor * max(0.0, expected_s), floor_s)
