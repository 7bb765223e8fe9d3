"""Worker health policy (services/policy/health.py) on a fake clock: circuit breakers,
suspect workers, the choice of another replica, and the stuck-batch rule."""
import pytest

from services.policy.health import (BreakerState, Candidate, HealthConfig, WorkerHealth, alternative,
                                    batch_stuck)

CFG = HealthConfig(failures_to_open=2, cooldown_s=1.0, max_cooldown_s=3.0, margin_s=0.25, margin_factor=2.0,
                   suspect_after=0.5)


def fail(h, wid, now, expected=0.01):
    return h.call_ended(h.call_started(wid, now, expected), now, failed=True)


def succeed(h, wid, now, expected=0.01):
    return h.call_ended(h.call_started(wid, now, expected), now, failed=False)


def test_consecutive_failures_open_the_breaker_and_a_success_in_between_resets_them():
    h = WorkerHealth(CFG)
    assert fail(h, "w", 0.0) is None and h.usable("w", 0.0)          # 1 of 2
    assert succeed(h, "w", 0.1) is None                               # reset
    assert fail(h, "w", 0.2) is None and h.usable("w", 0.2)
    assert fail(h, "w", 0.3) is BreakerState.OPEN
    assert not h.usable("w", 0.3) and h.state("w", 0.3) is BreakerState.OPEN


def test_open_half_open_probe_and_the_cool_down_doubling_up_to_its_cap():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    fail(h, "w", 0.0)                                                 # open at t=0
    assert not h.usable("w", 0.99)
    assert h.state("w", 1.0) is BreakerState.HALF_OPEN and h.usable("w", 1.0)
    probe = h.call_started("w", 1.0, 0.01)                            # the first call is the probe
    other = h.call_started("x", 1.0, 0.01)
    assert not h.usable("w", 1.0)                                     # one probe at a time
    assert h.call_ended(probe, 1.2, failed=True) is BreakerState.OPEN  # cool-down now 2 s
    h.call_ended(other, 1.2, failed=False)
    assert not h.usable("w", 3.1) and h.usable("w", 3.2)              # 1.2 + 2
    probe = h.call_started("w", 3.2, 0.01)
    h.call_ended(probe, 3.3, failed=True)                             # cool-down min(4, 3) = 3 s
    assert not h.usable("w", 6.2) and h.usable("w", 6.3)
    probe = h.call_started("w", 6.3, 0.01)
    assert h.call_ended(probe, 6.4, failed=False) is BreakerState.CLOSED
    fail(h, "w", 6.5)
    fail(h, "w", 6.5)                                                 # open again: cool-down back to 1 s
    assert h.usable("w", 7.5)


def test_a_cancelled_call_is_forgotten_without_an_outcome():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    t = h.call_started("w", 0.0, 0.01)
    assert h.call_ended(t, 0.1, failed=None) is None
    assert fail(h, "w", 0.2) is BreakerState.OPEN                     # the count went on from 1


def test_a_worker_with_a_call_well_past_its_expected_end_is_suspect():
    h = WorkerHealth(CFG)
    t = h.call_started("w", 10.0, 0.1)   # margin max(0.25, 2 x 0.1) = 0.25; suspect at 10.1 + 0.5 x 0.25
    assert h.margin_s(0.1) == pytest.approx(0.25) and h.margin_s(0.5) == pytest.approx(1.0)
    assert h.usable("w", 10.2) and not h.suspect("w", 10.2)
    assert h.suspect("w", 10.23) and not h.usable("w", 10.23)
    assert h.state("w", 10.23) is BreakerState.CLOSED                 # suspect is not a failure
    h.call_ended(t, 10.3, failed=True)
    assert not h.suspect("w", 10.3) and h.usable("w", 10.3)


def test_forget_drops_workers_that_left_the_plan_and_their_calls():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    fail(h, "w", 0.0)
    t = h.call_started("v", 0.0, 0.01)
    h.forget({"x"})
    assert h.usable("w", 0.0) and h.usable("v", 5.0)
    assert h.call_ended(t, 5.0, failed=True) is None
    assert h.snapshot(5.0) == {}


def test_another_replica_same_variant_first_then_another_variant_none_when_none_is_usable():
    cands = [Candidate("b", "v2", 1.0), Candidate("c", "v1", 0.0), Candidate("d", "v1", 0.0)]
    draws = []

    def u():
        draws.append(1)
        return 0.5

    assert alternative("v1", cands, lambda w: True, u) == "c"          # same variant, first listed
    assert alternative("v1", cands, lambda w: w != "c", u) == "d"
    assert draws == []                                                 # no weights: nothing drawn
    assert alternative("v1", cands, lambda w: w == "b", u) == "b"      # only another variant is left
    assert draws == [1]
    assert alternative("v1", cands, lambda w: False, u) is None
    weighted = [Candidate("c", "v1", 0.25), Candidate("d", "v1", 0.75)]
    assert alternative("v1", weighted, lambda w: True, lambda: 0.2) == "c"   # 0.2 x 1.0 < 0.25
    assert alternative("v1", weighted, lambda w: True, lambda: 0.3) == "d"


def test_a_batch_is_stuck_past_ten_times_its_expected_time_and_at_least_two_seconds():
    assert not batch_stuck(1.9, 0.01)          # under the 2 s floor
    assert batch_stuck(2.1, 0.01)              # max(10 x 0.01, 2) = 2
    assert not batch_stuck(4.9, 0.5)           # max(10 x 0.5, 2) = 5
    assert batch_stuck(5.1, 0.5)
    assert not batch_stuck(0.0, 0.0)
