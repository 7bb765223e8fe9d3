import heapq
import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from services.policy.admission import TokenBucket
from services.policy.batching import EdfQueue, ServiceTimeEstimator, cannot_make_it
from services.policy.routing import pick_weighted


def linear(per_item_s):
    return lambda n: per_item_s * n


def flat(pairs):
    """[(item, n)] -> [item] * n, in order."""
    return [x for x, n in pairs for _ in range(n)]


def test_edf_order_and_batch_limit():
    q = EdfQueue()
    for name, deadline in [("c", 30.0), ("a", 10.0), ("b", 20.0), ("d", 40.0)]:
        q.push(name, deadline)
    batch, dropped = q.take_batch(now=0.0, max_batch=3, exec_time_s=linear(0.1))
    assert flat(batch) == ["a", "b", "c"] and dropped == []
    assert len(q) == 1


def test_ties_keep_arrival_order():
    q = EdfQueue()
    for name in "xyz":
        q.push(name, 5.0)
    batch, _ = q.take_batch(0.0, 10, linear(0.01))
    assert flat(batch) == ["x", "y", "z"]


def test_queries_that_cannot_make_it_are_dropped_before_running():
    q = EdfQueue()
    q.push("late", 1.05)                  # 1.0 + 0.1 exec > 1.05
    q.push("reserve", 1.15, reserve_s=0.1)  # 1.0 + 0.1 + 0.1 > 1.15
    q.push("fine", 2.0)
    batch, dropped = q.take_batch(now=1.0, max_batch=8, exec_time_s=linear(0.1))
    assert flat(dropped) == ["late", "reserve"]
    assert flat(batch) == ["fine"]
    assert cannot_make_it(1.0, 0.1, 0.0, 1.05) and not cannot_make_it(1.0, 0.1, 0.0, 1.1)


def test_batch_stops_growing_when_a_member_would_become_late():
    q = EdfQueue()
    q.push("tight", 0.25)   # alone: 0.1 s, fine; in a batch of 3: 0.3 s, late
    q.push("b", 5.0)
    q.push("c", 5.0)
    batch, dropped = q.take_batch(0.0, max_batch=3, exec_time_s=linear(0.1))
    assert flat(batch) == ["tight", "b"]   # 2 x 0.1 = 0.2 <= 0.25
    assert dropped == [] and len(q) == 1


def test_a_batch_takes_part_of_a_group_and_leaves_the_rest_queued():
    q = EdfQueue()
    q.push("g", 10.0, count=5)
    batch, _ = q.take_batch(0.0, 3, linear(0.01))
    assert batch == [("g", 3)] and q.queued == 2
    batch, _ = q.take_batch(0.0, 3, linear(0.01))
    assert batch == [("g", 2)] and q.queued == 0 and q.drain() == []


def test_estimator_learns_per_size_and_scales_unknown_sizes():
    est = ServiceTimeEstimator(initial_per_item_s=0.01, alpha=0.5)
    assert est(4) == pytest.approx(0.04)
    est.observe(2, 0.1)
    assert est(2) == pytest.approx(0.1)
    est.observe(2, 0.2)
    assert est(2) == pytest.approx(0.15)   # 0.5 * 0.1 + 0.5 * 0.2


def test_seeded_estimator_uses_the_next_profiled_size():
    est = ServiceTimeEstimator.seeded({1: 0.02, 4: 0.05})
    assert [est(b) for b in (1, 2, 3, 4)] == pytest.approx([0.02, 0.05, 0.05, 0.05])
    assert est(8) == pytest.approx(0.16)          # beyond the profile: 8 x 0.02 per item
    assert ServiceTimeEstimator.seeded(None)(1) == ServiceTimeEstimator.DEFAULT_PER_ITEM_S


def test_pick_weighted_follows_the_weights():
    rng = random.Random(1)
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(20000):
        counts[pick_weighted({"a": 0.7, "b": 0.3, "c": 0.0}, rng.random())] += 1
    assert counts["c"] == 0
    assert counts["a"] / 20000 == pytest.approx(0.7, abs=0.02)
    with pytest.raises(ValueError):
        pick_weighted({"a": 0.0}, 0.5)


def test_token_bucket_sheds_above_the_rate():
    bucket = TokenBucket(10.0, burst_s=1.0)     # 10/s, burst of 10
    admitted = sum(bucket.admit(0.0) for _ in range(15))
    assert admitted == 10
    assert bucket.admit(0.05) is False          # 0.5 token refilled
    assert bucket.admit(0.1) is True            # 1 token after 0.1 s
    assert TokenBucket(None).admit(0.0) is True


class OneEntryPerQuery:
    """The batching rule written the obvious way, one heap entry per query: the
    specification :class:`EdfQueue` (groups with counts) must match."""

    def __init__(self):
        self.heap, self.seq = [], itertools.count()

    def __len__(self):
        return len(self.heap)

    def push(self, item, deadline, reserve):
        heapq.heappush(self.heap, (deadline, next(self.seq), reserve, item))

    def take_batch(self, now, max_batch, exec_time_s):
        batch, dropped = [], []
        while self.heap and len(batch) < max_batch:
            d, _, r, item = self.heap[0]
            if now + exec_time_s(1) + r > d:
                dropped.append(heapq.heappop(self.heap))
                continue
            finish = now + exec_time_s(len(batch) + 1)
            if batch and any(finish + e[2] > e[0] for e in (*batch, self.heap[0])):
                break
            batch.append(heapq.heappop(self.heap))
        return [e[3] for e in batch], [e[3] for e in dropped]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 6), st.sampled_from([0.0, 0.005, 0.02])),
                min_size=1, max_size=25),
       st.integers(1, 8), st.floats(0.0, 0.03), st.sampled_from([0.001, 0.004, 0.01]))
def test_groups_batch_exactly_like_one_entry_per_query(groups, max_batch, now, per_item):
    """Pushing a group of n is pushing n queries: same batches, same drops, in order."""
    ref, fast = OneEntryPerQuery(), EdfQueue()
    for i, (dl_ms, n, reserve) in enumerate(groups):
        for _ in range(n):
            ref.push(i, dl_ms / 1000.0, reserve)
        fast.push(i, dl_ms / 1000.0, reserve, n)

    def exec_time(size):
        return per_item * size if size % 3 else per_item * size * 1.5   # not monotone per item

    t = now
    while len(ref):
        b1, d1 = ref.take_batch(t, max_batch, exec_time)
        b2, d2 = fast.take_batch(t, max_batch, exec_time)
        assert b1 == flat(b2) and d1 == flat(d2)
        assert len(ref) == len(fast)
        t += 0.004
    assert fast.queued == 0


# -- shape buckets: a batch holds one bucket ------------------------------------------

def test_a_batch_holds_one_shape_bucket_chosen_by_the_earliest_query():
    q = EdfQueue()
    q.push("w320-a", 1.0, bucket=320)
    q.push("w640-a", 2.0, bucket=640)
    q.push("w320-b", 3.0, bucket=320)
    q.push("w640-b", 4.0, bucket=640)
    batch, _ = q.take_batch(0.0, 8, linear(0.01))
    assert flat(batch) == ["w320-a", "w320-b"]           # 320 leads; 640 waits
    assert q.buckets() == {640: 2} and q.peek() == "w640-a" and q.peek_deadline() == 2.0
    batch, _ = q.take_batch(0.0, 8, linear(0.01))
    assert flat(batch) == ["w640-a", "w640-b"] and q.queued == 0 and q.buckets() == {}


def test_heads_that_cannot_make_it_are_dropped_across_buckets_before_one_is_chosen():
    q = EdfQueue()
    q.push("late", 0.05, bucket="a")      # 0.1 s alone: too late
    q.push("b1", 1.0, bucket="b")
    q.push("a1", 2.0, bucket="a")
    batch, dropped = q.take_batch(0.0, 8, linear(0.1))
    assert flat(dropped) == ["late"] and flat(batch) == ["b1"]
    assert q.drain() == [("a1", 1)]


class BucketedReference:
    """The bucket rule written the obvious way: one :class:`OneEntryPerQuery` per bucket;
    drop the earliest query over all buckets while it cannot make it, then batch from the
    bucket of the earliest one left."""

    def __init__(self):
        self.seq = itertools.count()
        self.queues = {}

    def __len__(self):
        return sum(len(q) for q in self.queues.values())

    def push(self, item, deadline, reserve, bucket):
        q = self.queues.setdefault(bucket, OneEntryPerQuery())
        q.seq = self.seq
        q.push(item, deadline, reserve)

    def take_batch(self, now, max_batch, exec_time_s):
        dropped = []
        while len(self):
            bucket, q = min(((b, q) for b, q in self.queues.items() if len(q)), key=lambda bq: bq[1].heap[0][:2])
            d, _, r, item = q.heap[0]
            if now + exec_time_s(1) + r <= d:
                batch, more = q.take_batch(now, max_batch, exec_time_s)
                return batch, dropped + more
            dropped.append(heapq.heappop(q.heap)[3])
        return [], dropped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 6), st.sampled_from([0.0, 0.005, 0.02]),
                          st.sampled_from([None, 80, 320])),
                min_size=1, max_size=25),
       st.integers(1, 8), st.floats(0.0, 0.03), st.sampled_from([0.001, 0.004, 0.01]))
def test_bucketed_groups_batch_like_the_bucket_reference(groups, max_batch, now, per_item):
    """With buckets: same batches, same drops as the reference; every batch one bucket."""
    ref, fast = BucketedReference(), EdfQueue()
    bucket_of = {}
    for i, (dl_ms, n, reserve, bucket) in enumerate(groups):
        bucket_of[i] = bucket
        for _ in range(n):
            ref.push(i, dl_ms / 1000.0, reserve, bucket)
        fast.push(i, dl_ms / 1000.0, reserve, n, bucket=bucket)
    t = now
    while len(ref):
        b1, d1 = ref.take_batch(t, max_batch, linear(per_item))
        b2, d2 = fast.take_batch(t, max_batch, linear(per_item))
        assert b1 == flat(b2) and d1 == flat(d2)
        assert len({bucket_of[i] for i in b1}) <= 1
        assert len(ref) == fast.queued
        t += 0.004
    assert fast.queued == 0 and fast.buckets() == {}
