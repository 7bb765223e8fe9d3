"""The batching rule and early dropping: one implementation, run by the workers and
by the simulator.

Queued queries are served earliest-deadline-first. When the executor is free, the
worker takes up to ``max_batch`` queries in deadline order (work-conserving: it does
not wait for a batch to fill). Before a query is put into a batch it is checked
against its end-to-end budget: if ``now + expected execution + downstream reserve``
would pass its deadline it is dropped *before* it wastes compute
(:func:`cannot_make_it`; a worker applies the same test on arrival, before
pre-processing).

Queries travel in groups: the sub-queries of one request that a router sends to one
worker in one message share a deadline and a reserve. :class:`EdfQueue` holds a group
as one heap entry with a count; a batch may take part of a group and leave the rest
queued. Pushing a group of ``n`` is the same as pushing ``n`` queries one after
another (``tests/unit/test_batching.py`` checks it against a one-entry-per-query
reference on random inputs).

Queries may carry a *shape bucket* (any hashable; ``None`` when the model takes every
shape alike): a batch holds queries of one bucket only, since a model run takes one input
shape. The head of the whole queue (earliest deadline over all buckets) chooses the
bucket; the batch fills from that bucket in deadline order and the other buckets wait.
With one bucket the rule is the one above, unchanged.
"""
from __future__ import annotations

import heapq
import math
import itertools
from typing import Callable, Generic, Hashable, Mapping, Sequence, TypeVar

T = TypeVar("T")


def cannot_make_it(now: float, exec_s: float, reserve_s: float, deadline_s: float) -> bool:
    """True when a query that starts ``now`` and runs ``exec_s`` would leave less than
    ``reserve_s`` (what the stages below still need) before ``deadline_s``."""
    return now + exec_s + reserve_s > deadline_s


OVERRUN_AT = 0.5     # where between the earliest (0) and latest (1) queued deadline the drain may end


def overrun(now: float, queued: int, max_batch: int, batch_s: float, head_deadline: float,
            last_deadline: float, reserve_s: float) -> bool:
    """True when a worker's queue says its plan is overrun: draining the ``queued``
    queries at ``max_batch`` per batch of ``batch_s`` (``expected_finish_s``) would end
    later than halfway between the earliest and the latest deadline in the queue (less
    the downstream reserve), so the newer half of what waits would be dropped or late.
    The worker then runs its next batch on the plan's burst variant (``Plan.burst``):
    cheaper, less accurate, loaded beside the planned one, so capacity follows a step in
    demand at once instead of after a re-plan and a model load."""
    if queued <= max_batch:
        return False
    finish = now + -(-queued // max_batch) * batch_s
    return finish + reserve_s > head_deadline + OVERRUN_AT * (last_deadline - head_deadline)


def burst_batch(burst_s: Sequence[float], max_size: int, planned_batch_s: float) -> int:
    """The burst variant's batch size: the largest whose time (``burst_s[size]``) fits in
    the planned variant's full batch time, so a spilled batch delays no one more than a
    planned one would (at least 1). ``burst_s`` is indexed by batch size (1..max_size)."""
    best = 1
    for size in range(1, max_size + 1):
        if burst_s[size] <= planned_batch_s:
            best = size
    return best


class EdfQueue(Generic[T]):
    """Earliest-deadline-first queue of groups (stable tie-break on arrival order),
    counted in queries, one heap per shape bucket. Heap entries are lists
    ``[deadline, seq, count, reserve, item]`` (allocation-light: this is the simulator's
    inner loop); a bucket's heap exists only while it holds something."""

    def __init__(self) -> None:
        self._heaps: dict[Hashable, list[list]] = {}
        self._seq = itertools.count()
        self.queued = 0      # queries (not groups) waiting
        self.last_deadline = -math.inf   # the latest deadline pushed since the queue was last empty

    def __len__(self) -> int:
        return self.queued

    def push(self, item: T, deadline_s: float, reserve_s: float = 0.0, count: int = 1,
             bucket: Hashable = None) -> None:
        """Queue ``count`` queries (one group, ``item``) of shape bucket ``bucket``."""
        if count > 0:
            if not self._heaps:
                self.last_deadline = deadline_s
            elif deadline_s > self.last_deadline:
                self.last_deadline = deadline_s
            heap = self._heaps.get(bucket)
            if heap is None:
                heap = self._heaps[bucket] = []
            heapq.heappush(heap, [deadline_s, next(self._seq), count, reserve_s, item])
            self.queued += count

    def _head(self) -> tuple[Hashable, list[list]] | None:
        """The bucket (and its heap) whose first entry is first in EDF order over all buckets."""
        heaps = self._heaps
        if len(heaps) <= 1:
            return next(iter(heaps.items()), None)
        return min(heaps.items(), key=lambda kv: (kv[1][0][0], kv[1][0][1]))

    def buckets(self) -> dict[Hashable, int]:
        """Queries queued per shape bucket."""
        return {b: sum(e[2] for e in h) for b, h in self._heaps.items()}

    def peek_deadline(self) -> float | None:
        head = self._head()
        return head[1][0][0] if head else None

    def peek(self) -> T | None:
        """The item with the earliest deadline (not removed)."""
        head = self._head()
        return head[1][0][4] if head else None

    def take_batch(self, now: float, max_batch: int, exec_time_s: Callable[[int], float]
                   ) -> tuple[list[tuple[T, int]], list[tuple[T, int]]]:
        """Pop the next batch. Returns ``(batch, dropped)`` as lists of ``(item, count)``
        in EDF order.

        A query is dropped if even running alone now it would finish after its deadline
        minus its downstream reserve; the batch then grows in deadline order while every
        member can still make it with the larger batch's execution time. The batch's
        bucket is that of the earliest query that can make it; it takes queries of that
        bucket only."""
        batch: list[tuple[T, int]] = []
        dropped: list[tuple[T, int]] = []
        t1 = now + exec_time_s(1)
        while True:   # drop the heads that cannot make it, over all buckets, in EDF order
            found = self._head()
            if found is None:
                return batch, dropped
            bucket, heap = found
            d, _, n, r, item = heap[0]
            if t1 + r <= d:                       # not cannot_make_it(now, exec_time_s(1), r, d)
                break
            heapq.heappop(heap)
            dropped.append((item, n))
            self.queued -= n
            if not heap:
                del self._heaps[bucket]
        size = 0
        members: list[tuple[float, float]] = []   # (deadline, reserve) of the groups in the batch
        while heap and size < max_batch:
            head = heap[0]
            d, _, n, r, item = head
            if t1 + r > d:                        # cannot_make_it(now, exec_time_s(1), r, d)
                heapq.heappop(heap)
                dropped.append((item, n))
                self.queued -= n
                continue
            members.append((d, r))
            take = 0
            while take < n and size < max_batch:
                if size:
                    finish = now + exec_time_s(size + 1)
                    if any(finish + er > ed for ed, er in members):
                        break   # a bigger batch would make someone late: run what we have
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
        if not heap:
            del self._heaps[bucket]
        return batch, dropped

    def drain(self) -> list[tuple[T, int]]:
        """Remove and return everything queued, as ``(item, count)`` in EDF order."""
        out = [(e[4], e[2]) for e in sorted((e for h in self._heaps.values() for e in h),
                                             key=lambda e: (e[0], e[1]))]
        self._heaps.clear()
        self.queued = 0
        return out


class ServiceTimeEstimator:
    """Exponentially weighted estimate of batch execution time, learned per batch size;
    a size never seen is scaled from the per-item average. Seed it with the profile's
    figures (:meth:`seeded`) so the first batches are judged by what the variant is
    known to cost, not by a guess."""

    DEFAULT_PER_ITEM_S = 0.01   # only when nothing is known about the variant

    def __init__(self, initial_per_item_s: float = DEFAULT_PER_ITEM_S, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.by_size: dict[int, float] = {}
        self.per_item_s = initial_per_item_s

    @classmethod
    def seeded(cls, latency_s: Mapping[int, float] | None, alpha: float = 0.2) -> "ServiceTimeEstimator":
        """An estimator that starts from ``latency_s[batch size]`` (seconds; e.g. the
        profile's p50 per batch size). Sizes between known ones cost the next known one."""
        if not latency_s:
            return cls(alpha=alpha)
        known = sorted(int(b) for b in latency_s)
        est = cls(initial_per_item_s=latency_s[known[0]] / known[0], alpha=alpha)
        for b in range(1, known[-1] + 1):
            k = next(x for x in known if x >= b)
            est.by_size[b] = float(latency_s[k])
        return est

    def observe(self, size: int, seconds: float) -> None:
        prev = self.by_size.get(size)
        self.by_size[size] = seconds if prev is None else (1 - self.alpha) * prev + self.alpha * seconds
        self.per_item_s = (1 - self.alpha) * self.per_item_s + self.alpha * (seconds / max(1, size))

    def __call__(self, size: int) -> float:
        if size in self.by_size:
            return self.by_size[size]
        return self.per_item_s * size
