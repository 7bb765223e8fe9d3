"""Arrival schedules: Poisson determinism and rate, trace parsing and scaling."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.loadgen.schedule import (
    Arrival, TraceEntry, TraceError, parse_trace, poisson_schedule, read_trace,
    scale_rate_ms, trace_schedule)

SHARED_TRACE = Path(__file__).resolve().parents[2] / "traces" / "twitter_medium_normal.txt"


def test_poisson_is_deterministic_for_a_seed():
    a = poisson_schedule(20.0, 10.0, seed=7)
    assert a == poisson_schedule(20.0, 10.0, seed=7)
    assert a != poisson_schedule(20.0, 10.0, seed=8)


def test_poisson_is_sorted_and_inside_the_window():
    times = [x.t_s for x in poisson_schedule(100.0, 5.0, seed=1)]
    assert times == sorted(times)
    assert 0.0 < times[0] and times[-1] < 5.0
    assert all(x.deadline_ms is None for x in poisson_schedule(1.0, 5.0, seed=1))


def test_poisson_mean_rate():
    sched = poisson_schedule(50.0, 200.0, seed=3)
    # Expected count 50 * 200 = 10,000, standard deviation sqrt(10,000) = 100.
    assert abs(len(sched) - 10_000) < 4 * 100
    gaps = np.diff([0.0] + [x.t_s for x in sched])
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.04)  # exponential gaps, mean 1/rate
    assert gaps.std() == pytest.approx(1 / 50, rel=0.06)   # ... and std = mean


def test_poisson_longer_than_one_chunk_continues_the_stream():
    # Much lower realised rate than the first chunk's size guess: still one stream.
    sched = poisson_schedule(0.5, 3000.0, seed=5)
    assert abs(len(sched) - 1500) < 4 * 1500 ** 0.5


@pytest.mark.parametrize("rate, duration", [(0, 1), (-1, 1), (1, 0), (float("inf"), 1)])
def test_poisson_rejects_bad_arguments(rate, duration):
    with pytest.raises(ValueError):
        poisson_schedule(rate, duration, seed=0)


def test_parse_trace():
    lines = ["# arrival_ms,qos,deadline_ms", "", "171,1,300", " 243, 0, 250 ", "243,1,300\n"]
    assert parse_trace(lines) == [TraceEntry(171, 1, 300), TraceEntry(243, 0, 250),
                                  TraceEntry(243, 1, 300)]


@pytest.mark.parametrize("line, match", [
    ("171,1", r"t.txt:2: expected 'arrival_ms,qos,deadline_ms'"),
    ("a,1,300", "t.txt:2: not numbers"),
    ("1,1.5,300", "not numbers"),
    ("-1,1,300", "arrival_ms must be >= 0"),
    ("1,1,0", "deadline_ms must be > 0"),
    ("nan,1,300", "arrival_ms must be >= 0"),
])
def test_parse_trace_errors_name_the_line(line, match):
    with pytest.raises(TraceError, match=match):
        parse_trace(["0,1,300", line], source="t.txt")


ENTRIES = [TraceEntry(100, 1, 300), TraceEntry(250, 2, 300), TraceEntry(1000, 1, 400)]


def test_trace_schedule_time_scale():
    assert trace_schedule(ENTRIES) == [Arrival(0.1, 300, 1), Arrival(0.25, 300, 2),
                                       Arrival(1.0, 400, 1)]
    fast = trace_schedule(ENTRIES, time_scale=0.1)
    assert [a.t_s for a in fast] == pytest.approx([0.01, 0.025, 0.1])  # 100 ms * 0.1 = 10 ms
    assert [a.deadline_ms for a in fast] == [300, 300, 400]  # relative deadlines unchanged


def test_trace_schedule_duration_truncates_after_scaling():
    assert len(trace_schedule(ENTRIES, time_scale=2.0, duration_s=0.6)) == 2  # 0.2, 0.5 < 0.6 <= 2.0


def test_rate_scale_whole_numbers_replicate_exactly():
    pairs = scale_rate_ms([100, 250, 1000], 3.0, seed=0)
    assert len(pairs) == 9  # 3 entries x 3
    assert [i for _, i in pairs].count(1) == 3
    for t, i in pairs:  # replicas stay within 20 ms after their original
        assert [100, 250, 1000][i] <= t < [100, 250, 1000][i] + 20
    assert [t for t, _ in pairs] == sorted(t for t, _ in pairs)


def test_rate_scale_fraction_is_seeded_and_on_average_right():
    base = list(range(0, 20_000, 2))  # 10,000 arrivals
    half = scale_rate_ms(base, 0.5, seed=4)
    assert half == scale_rate_ms(base, 0.5, seed=4)
    # Binomial(10,000, 0.5): mean 5,000, std 50.
    assert abs(len(half) - 5_000) < 4 * 50
    more = scale_rate_ms(base, 1.25, seed=4)
    assert abs(len(more) - 12_500) < 4 * (10_000 * 0.25 * 0.75) ** 0.5


def test_trace_schedule_rate_scale_keeps_each_replica_s_metadata():
    sched = trace_schedule(ENTRIES, rate_scale=2.0, seed=1)
    assert len(sched) == 6
    assert sorted(a.deadline_ms for a in sched) == [300, 300, 300, 300, 400, 400]


def test_matches_the_briefs_published_scaled_traces():
    entries = read_trace(SHARED_TRACE)
    for scale, seed, count, peak in ((4.5, 1, 36_046, 479), (1.415, 2, 11_326, 146)):
        sched = trace_schedule(entries, rate_scale=scale, seed=seed)
        per_second = np.bincount(np.array([a.t_s for a in sched]).astype(int))
        assert (len(sched), int(per_second.max())) == (count, peak)
