"""The downstream reserve: the time the stages below a task still need after it, which
a worker of that task keeps free when it decides whether a query can still make its
deadline (early dropping) and a router when it decides whether to reroute.

The rule, for the routers and the simulator alike: the reserve of a task is, over its
child tasks, the largest of (the child's fastest single-query latency among the
variants the plan runs for it + the child's own reserve). A leaf's reserve is 0. It is
a lower bound (no queueing, the fastest variant), so a query is never dropped that
could have made its deadline.

Where the latencies come from is the caller's business: the simulator and planner-made
plans use the (calibrated) profile's p50; a router without figures in its plan uses
the fastest *successful* child round trip it measured (:class:`RoundTripFloor`), never
a failed call, which returns at once and would make the reserve collapse.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping, Sequence


def downstream_reserves(children: Mapping[str, Sequence[str]], fastest_s: Mapping[str, float]
                        ) -> dict[str, float]:
    """``{task: reserve_s}`` for every task in ``children`` (a tree: task -> child tasks).
    ``fastest_s[task]`` is the task's fastest single-query latency; a task missing
    from it counts 0 (nothing known: the bound stays a lower bound)."""
    out: dict[str, float] = {}

    def reserve(task: str, depth: int = 0) -> float:
        if task in out:
            return out[task]
        if depth > len(children):
            raise ValueError(f"the task graph has a cycle through {task!r}")
        need = 0.0
        for c in children.get(task, ()):
            need = max(need, fastest_s.get(c, 0.0) + reserve(c, depth + 1))
        out[task] = need
        return need

    for t in children:
        reserve(t)
    return out


class RoundTripFloor:
    """The fastest of the last ``window`` successful round trips to the stages below
    (seconds), for a router whose plan carries no latency figures."""

    def __init__(self, window: int = 200) -> None:
        self._ok: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float, ok: bool) -> None:
        """Record one child round trip; only successful ones count."""
        if ok and seconds > 0:
            self._ok.append(seconds)

    def value(self) -> float | None:
        return min(self._ok) if self._ok else None
