"""The batching rule and early dropping: pure policy shared by workers and the simulator.

Queued queries are served earliest-deadline-first. When the executor is free, the
worker takes up to ``max_batch`` queries in deadline order (work-conserving: it does
not wait for a batch to fill). Before a query is put into a batch it is checked
against its end-to-end budget: if ``now + expected execution + downstream reserve``
would pass its deadline it is dropped *before* it wastes compute.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class QueueEntry(Generic[T]):
    deadline_s: float
    seq: int
    item: T = field(compare=False)
    reserve_s: float = field(default=0.0, compare=False)   # what later stages still need


class EdfQueue(Generic[T]):
    """Earliest-deadline-first queue with a stable tie-break on arrival order."""

    def __init__(self) -> None:
        self._heap: list[QueueEntry[T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T, deadline_s: float, reserve_s: float = 0.0) -> QueueEntry[T]:
        entry = QueueEntry(deadline_s, next(self._seq), item, reserve_s)
        heapq.heappush(self._heap, entry)
        return entry

    def peek_deadline(self) -> float | None:
        return self._heap[0].deadline_s if self._heap else None

    def take_batch(self, now: float, max_batch: int, exec_time_s: Callable[[int], float]
                   ) -> tuple[list[QueueEntry[T]], list[QueueEntry[T]]]:
        """Pop the next batch. Returns ``(batch, dropped)``.

        A query is dropped if even running alone now it would finish after its deadline
        minus its downstream reserve; the batch then grows in deadline order while every
        member can still make it with the larger batch's execution time.
        """
        batch: list[QueueEntry[T]] = []
        dropped: list[QueueEntry[T]] = []
        while self._heap and len(batch) < max_batch:
            head = self._heap[0]
            if now + exec_time_s(1) + head.reserve_s > head.deadline_s:
                dropped.append(heapq.heappop(self._heap))
                continue
            size = len(batch) + 1
            finish = now + exec_time_s(size)
            if batch and any(finish + e.reserve_s > e.deadline_s for e in (*batch, head)):
                break   # a bigger batch would make someone late: run what we have
            batch.append(heapq.heappop(self._heap))
        return batch, dropped

    def drain(self) -> list[QueueEntry[T]]:
        out = sorted(self._heap)
        self._heap.clear()
        return out


class ServiceTimeEstimator:
    """Exponentially weighted estimate of batch execution time: ``a + b * size``
    learned per size, falling back to a per-item scaling of what has been seen."""

    def __init__(self, initial_per_item_s: float = 0.01, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.by_size: dict[int, float] = {}
        self.per_item_s = initial_per_item_s

    def observe(self, size: int, seconds: float) -> None:
        prev = self.by_size.get(size)
        self.by_size[size] = seconds if prev is None else (1 - self.alpha) * prev + self.alpha * seconds
        self.per_item_s = (1 - self.alpha) * self.per_item_s + self.alpha * (seconds / max(1, size))

    def __call__(self, size: int) -> float:
        if size in self.by_size:
            return self.by_size[size]
        return self.per_item_s * size


def pick_weighted(weights: dict[str, float], u: float) -> str:
    """Choose a key with probability proportional to its weight given ``u`` in [0, 1)."""
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        raise ValueError("no positive weight")
    acc = 0.0
    target = u * total
    last = None
    for key, w in weights.items():
        if w <= 0:
            continue
        acc += w
        last = key
        if target < acc:
            return key
    return last  # type: ignore[return-value]




class GroupedEdfQueue(Generic[T]):
    """:class:`EdfQueue` for groups of identical queries (same item, deadline and
    reserve: the sub-queries of one request sent to one worker together), with the same
    batching rule and early dropping as ``EdfQueue.take_batch``, counted in queries.

    Pushing ``count`` members of a group is equivalent to pushing ``count`` entries one
    after another into an ``EdfQueue`` (a unit test checks this on random inputs); a
    batch may take part of a group and leave the rest queued. Kept allocation-light for
    the simulator's inner loop: heap entries are lists ``[deadline, seq, count, reserve,
    item]``.
    """

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = itertools.count()
        self.queued = 0      # queries (not groups) waiting

    def __len__(self) -> int:
        return self.queued

    def push(self, item: T, deadline_s: float, reserve_s: float = 0.0, count: int = 1) -> None:
        if count > 0:
            heapq.heappush(self._heap, [deadline_s, next(self._seq), count, reserve_s, item])
            self.queued += count

    def take_batch(self, now: float, max_batch: int, exec_time_s: Callable[[int], float]
                   ) -> tuple[list[tuple[T, int]], list[tuple[T, int]]]:
        """Returns ``(batch, dropped)`` as lists of ``(item, count)``, in EDF order."""
        heap = self._heap
        batch: list[tuple[T, int]] = []
        dropped: list[tuple[T, int]] = []
        size = 0
        members: list[tuple[float, float]] = []   # (deadline, reserve) of the groups in the batch
        t1 = now + exec_time_s(1)
        while heap and size < max_batch:
            head = heap[0]
            d, _, n, r, item = head
            if t1 + r > d:
                heapq.heappop(heap)
                dropped.append((item, n))
                self.queued -= n
                continue
            members.append((d, r))
            take = 0
            while take < n and size < max_batch:
                if size:
                    finish = now + exec_time_s(size + 1)
                    # the same float expression as EdfQueue.take_batch, so results are identical
                    if any(finish + er > ed for ed, er in members):
                        break
                take += 1
                size += 1
            if take:
                batch.append((item, take))
                self.queued -= take
            if take == n:
                heapq.heappop(heap)
            else:
                head[2] = n - take
                break
        return batch, dropped

    def drain(self) -> list[tuple[T, int]]:
        out = [(e[4], e[2]) for e in sorted(self._heap)]
        self._heap.clear()
        self.queued = 0
        return out
