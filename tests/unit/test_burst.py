"""Issue 11, "react within the second": the pieces of the burst rule that the worker and
the simulator share (services.policy), the demand estimator's step detection, the plan's
``burst`` field, and the planner's off-peak worker saving."""
from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.plan import Plan, WorkerAssignment
from services.common.spec import SpecError
from services.planner import PlannerContext, load_profile, solve
from services.policy.batching import EdfQueue, burst_batch, overrun
from services.policy.demand import DemandEstimator
from services.policy.planning import PlannerPolicy, burst_variant, with_burst_variants
from services.policy.routing import StageRouting
from services.sim.arrivals import heavy_tail_bursts, peak_rate


def test_the_queue_remembers_its_latest_deadline_until_it_empties():
    q: EdfQueue[str] = EdfQueue()
    assert q.last_deadline == -math.inf
    q.push("a", 5.0)
    q.push("b", 9.0)
    q.push("c", 7.0)
    assert (q.peek_deadline(), q.last_deadline) == (5.0, 9.0)
    q.take_batch(0.0, 8, lambda n: 0.1)
    q.push("d", 3.0)                 # pushed into an empty queue: the old latest is gone
    assert q.last_deadline == 3.0


@pytest.mark.parametrize("queued, batch_s, expect", [
    (4, 1.0, False),     # one batch or less waits: never overrun
    (8, 1.0, False),     # two batches end at t=2 < midpoint 5 of deadlines 2..8
    (20, 1.0, True),     # five batches end at t=5 + reserve 0.5 > midpoint 5
    (20, 0.5, False),    # ... but not when batches are twice as fast
])
def test_overrun_is_when_draining_the_queue_would_miss_its_middle_deadline(queued, batch_s, expect):
    assert overrun(0.0, queued, 4, batch_s, head_deadline=2.0, last_deadline=8.0, reserve_s=0.5) is expect


def test_the_burst_batch_is_the_largest_that_fits_in_a_planned_batch():
    burst_s = [0.0, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]   # index = batch size
    assert burst_batch(burst_s, 8, planned_batch_s=0.035) == 4
    assert burst_batch(burst_s, 8, planned_batch_s=1.0) == 8
    assert burst_batch(burst_s, 8, planned_batch_s=0.001) == 1     # never zero


def test_a_path_the_plan_did_not_foresee_goes_to_the_stage_by_planned_share():
    st = StageRouting("cls")
    st.set_plan({"det_a": {"w1": 1.0}, "det_b": {"w2": 3.0}}, {"det_a": 10.0, "det_b": 30.0},
                {"w1": 0.9, "w2": 0.9})
    draws = iter(np.linspace(0.0, 0.999, 400))
    got = st.split("det_burst", 400, lambda: next(draws))
    assert set(got) == {"w1", "w2"} and got["w2"] == pytest.approx(300, abs=2)


def test_a_step_up_is_estimated_within_a_second_and_noise_is_not_a_step():
    est = DemandEstimator()
    for t in range(30):                     # 100 req/s, steady
        est.observe("fd", 100.0 * t, float(t))
        est.update(float(t))
    assert est.estimate == pytest.approx(100.0, rel=0.02)
    est.observe("fd", 100.0 * 29 + 700.0, 30.0)     # the next second brings 700
    assert est.update(30.0) > 0.9 * 700.0 * (1 - math.exp(-1.0))    # the 5 s window alone: < 220
    slow = DemandEstimator(rise_window_s=None)
    for t in range(30):
        slow.observe("fd", 100.0 * t, float(t))
        slow.update(float(t))
    slow.observe("fd", 100.0 * 29 + 700.0, 30.0)
    assert slow.update(30.0) < 0.5 * est.estimate
    calm = DemandEstimator()                # +25 per second: within 3 sigmas of Poisson at 100
    count = 0.0
    for t in range(40):
        count += 125.0 if t % 2 else 75.0
        calm.observe("fd", count, float(t))
        calm.update(float(t))
    assert calm.estimate == pytest.approx(100.0, rel=0.1)


def test_the_plan_names_its_burst_variants_and_round_trips_them():
    prof = load_profile("profiles/traffic_analysis.json")
    assert burst_variant(prof.task("object_detection"), 125.0) == "yolov5n"
    w = {"w0": WorkerAssignment("w0", "a:1", "object_detection", "yolov5x", 1)}
    plan = with_burst_variants(Plan(1, prof.name, w, {}), prof, 250.0)
    assert plan.burst["object_detection"] == "yolov5n"
    assert set(plan.latency_ms["object_detection"]) == {"yolov5n"}
    back = Plan.from_json(plan.to_json())
    assert back.burst == plan.burst and back.latency_ms == plan.latency_ms
    bad = plan.to_dict()
    bad["burst"] = {"object_detection": 3}
    with pytest.raises(SpecError, match="burst"):
        Plan.from_dict(bad)


def test_planner_policy_plans_name_burst_variants_only_when_asked():
    prof = load_profile("profiles/social_media.json")
    from services.common.plan import RegisteredWorker
    pool = [RegisteredWorker(f"w{i}", f"h:{i}", "") for i in range(6)]
    plain = PlannerPolicy(prof, prof.slo_ms, verbose=False).decide(pool, 20.0, None, now=0.0, version=1)
    burst = PlannerPolicy(prof, prof.slo_ms, verbose=False, burst=True).decide(pool, 20.0, None, now=0.0, version=1)
    assert plain.burst == {}
    assert set(burst.burst) == {t.name for t in prof.tasks}


def test_heavy_tailed_bursts_reach_the_peak_and_repeat_for_a_seed():
    a = heavy_tail_bursts(50.0, 400.0, 300.0, seed=3)
    b = heavy_tail_bursts(50.0, 400.0, 300.0, seed=3)
    assert np.array_equal(a, b)
    assert 0.8 * 400 <= peak_rate(a) <= 1.2 * 400
    assert 45.0 < np.median(np.bincount(a.astype(int))) < 60.0   # mostly the base rate


def test_the_off_peak_headroom_rises_to_the_peak_headroom_between_a_quarter_and_half_capacity():
    prof = load_profile("profiles/social_media.json")
    p = PlannerPolicy(prof, prof.slo_ms, verbose=False, headroom=2.0)
    assert p.headroom_for(10.0) == 2.0                      # no off-peak headroom: one headroom
    p.headroom_low = 1.25
    assert p.headroom_for(10.0) == 2.0                      # capacity not known yet (no decide)
    from services.common.plan import RegisteredWorker
    pool = [RegisteredWorker(f"w{i}", f"h:{i}", "") for i in range(20)]
    p.decide(pool, 10.0, None, now=0.0, version=1)
    c = p.full_capacity_qps
    assert c and c > 0
    assert p.headroom_for(0.2 * c) == pytest.approx(1.25)
    assert p.headroom_for(0.375 * c) == pytest.approx(1.625)
    assert p.headroom_for(0.6 * c) == pytest.approx(2.0)
    assert p.target_demand(0.2 * c) == pytest.approx(1.25 * 0.2 * c)
