"""Synthetic load shapes (services/loadgen/schedule.py: RateShape, shape_schedule).

Counts are checked against the shape's expected count (its rate's integral) with bounds of
5 standard deviations of a Poisson count: a correct generator fails one such check with
probability below 1e-6, a generator off by a constant factor or with the wrong shape fails
it for certain at these sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from services.loadgen.schedule import RateShape, poisson_schedule, shape_schedule


def within_bounds(count: int, expected: float, sigmas: float = 5.0) -> bool:
    return abs(count - expected) <= sigmas * math.sqrt(max(expected, 1.0))


def window_counts(schedule, duration_s: float, window_s: float) -> np.ndarray:
    times = np.array([a.t_s for a in schedule])
    edges = np.arange(0.0, duration_s + 1e-9, window_s)
    return np.histogram(times, bins=edges)[0]


SQUARE = RateShape("square", rate=20.0, peak_rate=200.0, period_s=10.0)
STEP = RateShape("step", rate=30.0, peak_rate=150.0, step_at_s=20.0)
DIURNAL = RateShape("diurnal", rate=10.0, peak_rate=210.0, period_s=40.0)


@pytest.mark.parametrize("shape", [SQUARE, STEP, DIURNAL, RateShape("constant", rate=80.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_count_matches_the_rate_integral(shape, seed):
    duration = 40.0
    schedule = shape_schedule(shape, duration, seed)
    assert within_bounds(len(schedule), shape.expected_count(0.0, duration)), (len(schedule), shape)
    times = [a.t_s for a in schedule]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < duration


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    a, b = shape_schedule(SQUARE, 30.0, 7), shape_schedule(SQUARE, 30.0, 7)
    assert a == b
    assert shape_schedule(SQUARE, 30.0, 8) != a


def test_constant_is_exactly_the_poisson_schedule():
    assert shape_schedule(RateShape("constant", rate=12.0), 10.0, 3) == poisson_schedule(12.0, 10.0, 3)


def test_square_wave_alternates_between_its_two_rates():
    # period 10 s, duty 0.5: [0, 5) at 20/s, [5, 10) at 200/s, and again
    counts = window_counts(shape_schedule(SQUARE, 40.0, 0), 40.0, 5.0)
    for i, n in enumerate(counts):
        expected = 5.0 * (20.0 if i % 2 == 0 else 200.0)
        assert within_bounds(int(n), expected), (i, n, expected)


def test_square_wave_with_zero_base_rate_is_off_in_its_off_phases():
    shape = RateShape("square", rate=0.0, peak_rate=50.0, period_s=4.0, duty=0.25)
    schedule = shape_schedule(shape, 20.0, 1)
    phases = [(a.t_s % 4.0) / 4.0 for a in schedule]
    assert schedule and all(p >= 0.75 for p in phases)
    assert within_bounds(len(schedule), 5 * 1.0 * 50.0)


def test_step_changes_rate_at_its_time():
    schedule = shape_schedule(STEP, 40.0, 0)
    before = sum(1 for a in schedule if a.t_s < 20.0)
    after = len(schedule) - before
    assert within_bounds(before, 20.0 * 30.0) and within_bounds(after, 20.0 * 150.0)


def test_diurnal_rises_to_its_peak_at_half_period_and_falls_back():
    counts = window_counts(shape_schedule(DIURNAL, 40.0, 0), 40.0, 4.0)
    for i, n in enumerate(counts):
        assert within_bounds(int(n), DIURNAL.expected_count(4.0 * i, 4.0 * (i + 1))), (i, n)
    assert counts[4] + counts[5] > 4 * (counts[0] + counts[9])   # the peak is in the middle


def test_expected_count_of_piecewise_shapes_is_exact():
    assert SQUARE.expected_count(0.0, 10.0) == pytest.approx(5 * 20 + 5 * 200)
    assert SQUARE.expected_count(2.5, 7.5) == pytest.approx(2.5 * 20 + 2.5 * 200)
    assert STEP.expected_count(10.0, 30.0) == pytest.approx(10 * 30 + 10 * 150)
    # the sine's mean over whole periods is the midpoint of its two rates
    assert DIURNAL.expected_count(0.0, 80.0) == pytest.approx(80 * 110.0, rel=1e-6)


@pytest.mark.parametrize("shape, message", [
    (RateShape("sawtooth", rate=1.0), "unknown shape"),
    (RateShape("constant", rate=0.0), "rate > 0"),
    (RateShape("square", rate=1.0, period_s=2.0), "peak rate"),
    (RateShape("square", rate=1.0, peak_rate=5.0), "period"),
    (RateShape("square", rate=1.0, peak_rate=5.0, period_s=2.0, duty=1.0), "duty"),
    (RateShape("step", rate=1.0, peak_rate=5.0), "step time"),
    (RateShape("diurnal", rate=-1.0, peak_rate=5.0, period_s=2.0), "rate must be >= 0"),
])
def test_bad_shapes_are_refused_with_the_reason(shape, message):
    with pytest.raises(ValueError, match=message):
        shape_schedule(shape, 10.0, 0)


def test_the_cli_turns_shape_options_into_a_config():
    from services.loadgen.main import build_parser, config_from_args

    args = build_parser().parse_args(
        ["--pages", "d", "--shape", "square", "--rate", "0", "--peak-rate", "8", "--period-s", "60",
         "--duty", "0.25", "--duration", "120", "--controller", "h:1", "--plan-interval-s", "2"])
    c = config_from_args(args)
    assert c.rate is None and c.shape == RateShape("square", 0.0, 8.0, 60.0, None, 0.25)
    assert (c.controller, c.plan_interval_s, c.duration_s) == ("h:1", 2.0, 120.0)
    c.validate()
    plain = config_from_args(build_parser().parse_args(["--pages", "d", "--rate", "3", "--duration", "5"]))
    assert plain.rate == 3.0 and plain.shape is None
