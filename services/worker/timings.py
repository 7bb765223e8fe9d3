"""What the worker's batches cost, kept per (task, variant, batch size) between two
heartbeats: the controller calibrates the profile with them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchTiming:
    """What batches of one (variant, batch size) cost since the last report: the sum of
    the batch's model time and its items' pre-processing time (the profile's
    definition of a batch latency), and the regions its items produced."""

    variant: str
    batch_size: int
    count: int = 0
    task: str = ""
    total_ms: float = 0.0
    max_ms: float = 0.0
    items: int = 0
    regions: int = 0


class TimingBook:
    """Batch timings since the last heartbeat. A heartbeat takes them (:meth:`take`); one
    that fails puts them back (:meth:`restore`), so each batch is reported exactly once."""

    def __init__(self) -> None:
        self._timings: dict[tuple[str, str, int], BatchTiming] = {}

    def record(self, task: str, variant: str, size: int, work_s: float, regions: int) -> None:
        t = self._timings.get((task, variant, size))
        if t is None:
            t = self._timings[(task, variant, size)] = BatchTiming(variant, size, task=task)
        ms = work_s * 1e3
        t.count += 1
        t.total_ms += ms
        t.max_ms = max(t.max_ms, ms)
        t.items += size
        t.regions += regions

    def take(self) -> list[BatchTiming]:
        """The batch timings since the last call (the heartbeat reports them once)."""
        out = list(self._timings.values())
        self._timings = {}
        return out

    def restore(self, timings: list[BatchTiming]) -> None:
        """Put back timings whose report failed, so the next heartbeat carries them."""
        for t in timings:
            cur = self._timings.get((t.task, t.variant, t.batch_size))
            if cur is None:
                self._timings[(t.task, t.variant, t.batch_size)] = t
            else:
                cur.count += t.count
                cur.total_ms += t.total_ms
                cur.max_ms = max(cur.max_ms, t.max_ms)
                cur.items += t.items
                cur.regions += t.regions
