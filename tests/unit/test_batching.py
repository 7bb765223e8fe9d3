import random

import pytest

from services.policy.admission import TokenBucket
from services.policy.batching import EdfQueue, ServiceTimeEstimator, pick_weighted


def linear(per_item_s):
    return lambda n: per_item_s * n


def test_edf_order_and_batch_limit():
    q = EdfQueue()
    for name, deadline in [("c", 30.0), ("a", 10.0), ("b", 20.0), ("d", 40.0)]:
        q.push(name, deadline)
    batch, dropped = q.take_batch(now=0.0, max_batch=3, exec_time_s=linear(0.1))
    assert [e.item for e in batch] == ["a", "b", "c"] and dropped == []
    assert len(q) == 1


def test_ties_keep_arrival_order():
    q = EdfQueue()
    for name in "xyz":
        q.push(name, 5.0)
    batch, _ = q.take_batch(0.0, 10, linear(0.01))
    assert [e.item for e in batch] == ["x", "y", "z"]


def test_queries_that_cannot_make_it_are_dropped_before_running():
    q = EdfQueue()
    q.push("late", 1.05)                  # 1.0 + 0.1 exec > 1.05
    q.push("reserve", 1.15, reserve_s=0.1)  # 1.0 + 0.1 + 0.1 > 1.15
    q.push("fine", 2.0)
    batch, dropped = q.take_batch(now=1.0, max_batch=8, exec_time_s=linear(0.1))
    assert [e.item for e in dropped] == ["late", "reserve"]
    assert [e.item for e in batch] == ["fine"]


def test_batch_stops_growing_when_a_member_would_become_late():
    q = EdfQueue()
    q.push("tight", 0.25)   # alone: 0.1 s, fine; in a batch of 3: 0.3 s, late
    q.push("b", 5.0)
    q.push("c", 5.0)
    batch, dropped = q.take_batch(0.0, max_batch=3, exec_time_s=linear(0.1))
    assert [e.item for e in batch] == ["tight", "b"]   # 2 x 0.1 = 0.2 <= 0.25
    assert dropped == [] and len(q) == 1


def test_estimator_learns_per_size_and_scales_unknown_sizes():
    est = ServiceTimeEstimator(initial_per_item_s=0.01, alpha=0.5)
    assert est(4) == pytest.approx(0.04)
    est.observe(2, 0.1)
    assert est(2) == pytest.approx(0.1)
    est.observe(2, 0.2)
    assert est(2) == pytest.approx(0.15)   # 0.5 * 0.1 + 0.5 * 0.2


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
