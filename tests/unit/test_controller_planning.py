"""Planner mode of the controller: demand estimation and the planning policy, with the
real CVXPY planner on a small OCR-shaped profile."""
import asyncio
import math
from pathlib import Path

import pytest

from services.common.plan import RegisteredWorker, validate_plan
from services.common.spec import load_spec
from services.controller.core import ControllerCore
from services.policy.demand import DemandEstimator
from services.policy.planning import PlannerPolicy
from services.controller.registry import WorkerRegistry
from services.planner import parse_profile

from ocr_like_profile import ocr_like_profile_dict  # tests/unit is on sys.path (rootdir-less test dir)

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml")
WORKERS = [RegisteredWorker("det-0", "h:1", "det"), RegisteredWorker("rec-0", "h:2", "rec")]


def policy(**kw):
    return PlannerPolicy(parse_profile(ocr_like_profile_dict(), source="test"), SPEC.slo_ms, **kw)


def test_demand_estimate_follows_the_counters():
    est = DemandEstimator(tau_s=2.0, window_s=5.0)
    for t in range(0, 21):                        # 10 req/s from one front door
        est.observe("fd-a", 10.0 * t, float(t))
        est.update(float(t))
    assert est.update(20.0) == pytest.approx(10.0, rel=0.01)
    for t in range(21, 41):                       # a second front door adds 5 req/s
        est.observe("fd-a", 10.0 * t, float(t))
        est.observe("fd-b", 5.0 * (t - 21), float(t))
        est.update(float(t))
    assert est.update(40.0) == pytest.approx(15.0, rel=0.02)
    # Poisson-like jitter (counts alternating 6 and 14 per second) is not overestimated
    jitter = DemandEstimator(tau_s=3.0, window_s=5.0)
    count = 0
    for t in range(60):
        count += 6 if t % 2 else 14
        jitter.observe("fd", count, float(t))
        jitter.update(float(t))
    assert jitter.update(59.0) == pytest.approx(10.0, rel=0.1)
    est.observe("fd-a", 0.0, 41.0)                # fd-a restarted: counter reset is not negative demand
    assert est.update(41.0) > 0
    assert est.update(60.0) < 1.0                 # both silent for > 10 s: stale, demand decays to 0


def test_low_demand_is_served_at_full_accuracy_and_high_demand_scales_accuracy():
    pol = policy()
    low = pol.decide(WORKERS, estimate_qps=1.0, previous=None, now=0.0)
    validate_plan(low, SPEC)
    high = pol.decide(WORKERS, estimate_qps=8.0, previous=low, now=1.0)
    validate_plan(high, SPEC)
    assert low.expected_accuracy > high.expected_accuracy
    det_low = low.workers["det-0"].variant
    det_high = high.workers["det-0"].variant
    assert det_low == "det_v6small_640" and det_high != det_low
    # 8 req/s x 1.25 headroom = 10 req/s: beyond what det_v6small_640 (145 ms/page) carries on one worker
    assert 10.0 * 0.145 > 1.0


def test_replanning_is_hysteretic():
    pol = policy(replan_threshold=0.2, cooldown_s=15.0)
    pol.decide(WORKERS, 4.0, None, now=0.0)
    assert not pol.should_replan(WORKERS, 4.4, now=1.0)         # +10 %
    assert pol.should_replan(WORKERS, 5.0, now=1.0)             # +25 %: at once
    assert not pol.should_replan(WORKERS, 3.0, now=1.0)         # -25 %: within the band
    assert not pol.should_replan(WORKERS, 2.0, now=1.0)         # -50 %, but the plan is 1 s old
    assert pol.should_replan(WORKERS, 2.0, now=16.0)            # -50 % after the cooldown
    assert pol.should_replan(WORKERS[:1] + [RegisteredWorker("rec-9", "h:9", "rec")], 4.0, now=1.0)
    assert pol.should_replan(WORKERS, 4.0, now=61.0)            # plan too old


class Publisher:
    def __init__(self):
        self.version = 0
        self.plans = []

    async def __call__(self, plan):
        self.version += 1
        self.plans.append(plan.with_version(self.version))
        return self.plans[-1]


def test_controller_core_publishes_planner_plans_and_an_operator_plan_takes_over():
    pub = Publisher()
    clock = [0.0]
    core = ControllerCore(SPEC, WorkerRegistry(clock=lambda: clock[0]), pub, planner=policy(),
                          clock=lambda: clock[0])
    for w in WORKERS:
        core.registry.register(w.worker_id, w.address, w.task, [])
    core.demand_qps = 1.0
    asyncio.run(core.reconcile())
    assert len(pub.plans) == 1 and pub.plans[0].source.startswith("planner:")
    clock[0] = 0.5
    asyncio.run(core.reconcile())                  # same demand: no re-solve, no new version
    assert len(pub.plans) == 1
    core.demand_qps = 8.0
    for wid in ("det-0", "rec-0"):
        core.registry.heartbeat(wid, {})
    asyncio.run(core.reconcile())
    assert len(pub.plans) == 2 and pub.plans[1].workers["det-0"].variant != pub.plans[0].workers["det-0"].variant
    core.set_plan_text("pipeline: ocr\nallocations:\n  - {task: det, variant: det_v6tiny_320}\n"
                       "  - {task: rec, variant: rec_v6tiny}\n")
    asyncio.run(core.reconcile())
    assert pub.plans[-1].source == "operator" and core.planner is None


def test_demand_estimate_rises_faster_than_it_falls():
    est = DemandEstimator(tau_s=3.0, window_s=1.0, tau_up_s=1.0)
    count = 0.0
    for t in range(30):
        count += 10
        est.observe("fd", count, float(t))
        est.update(float(t))
    assert est.estimate == pytest.approx(10.0, rel=0.01)
    for t in range(30, 32):                         # a step up to 30 req/s, 2 s later
        count += 30
        est.observe("fd", count, float(t))
        est.update(float(t))
    up = est.estimate - 10.0
    for t in range(32, 100):
        count += 30
        est.observe("fd", count, float(t))
        est.update(float(t))
    for t in range(100, 102):                       # a step back down to 10 req/s, 2 s later
        count += 10
        est.observe("fd", count, float(t))
        est.update(float(t))
    down = 30.0 - est.estimate
    assert up == pytest.approx(20 * (1 - math.exp(-2 / 1.0)), rel=0.02)
    assert down == pytest.approx(20 * (1 - math.exp(-2 / 3.0)), rel=0.02)
    sym = DemandEstimator(tau_s=3.0, tau_up_s=None)
    assert sym.tau_up_s == sym.tau_s == 3.0


def test_an_operator_plan_set_during_a_solve_is_not_overwritten():
    """Regression: SetPlan ran its own control step while the loop's step was still
    solving; the planner's result was then published over the operator's plan."""
    import threading

    pub = Publisher()
    release = threading.Event()
    entered = threading.Event()
    pol = policy()
    real = pol.solver

    def slow_solver(ctx, previous):
        entered.set()
        release.wait(10)             # the solve takes "seconds"
        return real(ctx, previous)

    pol.solver = slow_solver
    core = ControllerCore(SPEC, WorkerRegistry(), pub, planner=pol)
    for w in WORKERS:
        core.registry.register(w.worker_id, w.address, w.task, [])
    core.demand_qps = 1.0
    operator = ("pipeline: ocr\nallocations:\n  - {task: det, variant: det_v6tiny_320}\n"
                "  - {task: rec, variant: rec_v6tiny}\n")

    async def scenario():
        loop_step = asyncio.create_task(core.reconcile())
        while not entered.is_set():
            await asyncio.sleep(0.01)
        set_plan = asyncio.create_task(core.set_operator_plan(operator))
        await asyncio.sleep(0.05)
        assert not set_plan.done()   # waits for the step in progress
        release.set()
        await loop_step
        return await set_plan

    result = asyncio.run(scenario())
    assert [p.source.split(":")[0] for p in pub.plans] == ["planner", "operator"]
    assert result.published is pub.plans[-1] and core.current is pub.plans[-1]
    assert core.current.workers["det-0"].variant == "det_v6tiny_320"
    asyncio.run(core.reconcile())               # the loop goes on: the operator's plan stays
    assert len(pub.plans) == 2


def test_a_restarted_controller_keeps_the_adopted_plan_until_its_workers_are_back():
    pub = Publisher()
    clock = [0.0]
    pol = policy()
    first = pol.decide(WORKERS, 1.0, None, now=0.0).with_version(7)
    core = ControllerCore(SPEC, WorkerRegistry(clock=lambda: clock[0]), pub, planner=policy(),
                          clock=lambda: clock[0])
    core.adopt(first, grace_s=10.0)
    core.demand_qps = 1.0
    core.registry.register("det-0", "h:1", "det", [])
    asyncio.run(core.reconcile())
    assert pub.plans == [] and core.current is first       # rec-0 has not re-registered yet
    core.registry.register("rec-0", "h:2", "rec", [])
    core.demand_ready = False
    asyncio.run(core.reconcile())
    assert pub.plans == []                                 # no demand measured yet either
    core.demand_ready = True
    asyncio.run(core.reconcile())
    # planned with the adopted plan as the previous one: the same workers, the same variants
    # (an identical plan is not even published again)
    assert core.adopted is None
    assert all(core.current.workers[w].variant == first.workers[w].variant for w in first.workers)


def test_measured_batch_times_recalibrate_the_profile_and_replan():
    from services.policy.calibration import Timing

    pol = policy()
    plan = pol.decide(WORKERS, 1.0, None, now=0.0)
    assert not pol.should_replan(WORKERS, 1.0, now=1.0)
    det = plan.workers["det-0"]
    base = pol.profile.task("det").variant(det.variant).latency_ms[det.batch_size].p50_ms
    pol.observe_timings([Timing("det", det.variant, det.batch_size, 20, 20 * 2.0 * base)])   # 2x slower
    assert pol.should_replan(WORKERS, 1.0, now=2.0)
    again = pol.decide(WORKERS, 1.0, plan, now=2.0)
    assert again.calibration[f"det/{det.variant}"] == pytest.approx(2.0, rel=0.01)
    # the host factor applies to what has not run yet: rec is assumed 2x slower too
    assert again.calibration["rec/rec_v6tiny"] == pytest.approx(2.0, rel=0.01)
    assert again.latency_ms["det"][again.workers["det-0"].variant]
    assert not pol.should_replan(WORKERS, 1.0, now=3.0)


def test_the_demand_estimate_is_ready_once_a_front_door_spans_the_window():
    est = DemandEstimator(window_s=5.0)
    assert not est.ready
    for t in range(5):
        est.observe("fd", 2.0 * t, float(t))
    assert not est.ready                       # 0..4 s: a 4 s span
    est.observe("fd", 10.0, 5.0)
    assert est.ready                           # 0..5 s


def test_a_restarted_controller_plans_on_the_host_speed_its_predecessor_measured():
    """The adopted plan carries the calibration it was made on and its planned demand: the
    new controller starts from both, so its workers' re-registrations cause no new solve,
    and a later solve plans on the measured speed (on the raw profile it would swap)."""
    from services.policy.calibration import Timing

    old = policy()
    old.decide(WORKERS, 1.0, None, now=0.0)
    timings = []
    for t in old.profile.tasks:                 # a host 3x slower than the profile, every variant
        for v in t.variants:
            b = min(v.latency_ms)
            timings.append(Timing(t.name, v.name, b, 20, 20 * 3.0 * v.latency_ms[b].p50_ms))
    old.observe_timings(timings)
    first = old.decide(WORKERS, 3.0, None, now=1.0).with_version(7)
    assert first.calibration and all(abs(f - 3.0) < 1e-6 for f in first.calibration.values())
    raw = policy().decide(WORKERS, 3.0, None, now=0.0)   # what a controller without it plans
    assert {w: a.variant for w, a in raw.workers.items()} != {w: a.variant for w, a in first.workers.items()}
    clock = [0.0]
    pub = Publisher()
    core = ControllerCore(SPEC, WorkerRegistry(clock=lambda: clock[0]), pub, planner=policy(),
                          clock=lambda: clock[0])
    core.adopt(first, grace_s=10.0)
    core.demand_qps = 3.0
    for w in WORKERS:
        core.registry.register(w.worker_id, w.address, w.task, [])
    core.dirty = True                            # as the registrations set it
    asyncio.run(core.reconcile())
    assert core.adopted is None and pub.plans == [] and core.current is first   # no solve, no plan
    clock[0] = 5.0
    asyncio.run(core.reconcile())
    assert pub.plans == []                       # nothing changed since: still none
    # the profile it will plan on is the measured one, not the raw profile
    det = first.workers["det-0"]
    used = core.planner.current_profile().task("det").variant(det.variant).latency_ms
    base = core.planner.profile.task("det").variant(det.variant).latency_ms
    assert all(abs(used[b].p50_ms - 3.0 * base[b].p50_ms) < 1e-6 for b in base)
    # and a real reason (demand up 50 %) re-plans at once
    core.demand_qps = 4.5
    asyncio.run(core.reconcile())
    assert len(pub.plans) == 1


def feed(arrivals, until, est, check_s=0.1, period_s=1.0, controller_s=0.25):
    """The front door's reporter (a check every ``check_s``, :func:`report_due`) and the
    controller's loop (every ``controller_s``) over the arrival times: (time, estimate) pairs."""
    from services.policy.demand import DemandReporter

    arrivals = sorted(arrivals)
    reporter = DemandReporter(period_s)
    assert reporter.due(0.0, 0)          # the first check reports
    i, out, t = 0, [], 0.0
    next_ctl = 0.0
    while t < until:
        t = round(t + check_s, 6)
        while i < len(arrivals) and arrivals[i] <= t:
            i += 1
        if reporter.due(t, i):
            est.observe("fd", float(i), t)
        if t >= next_ctl - 1e-9:
            next_ctl = t + controller_s
            out.append((t, est.update(t)))
    return out


def poisson_times(rng, rate, t0, t1):
    times, t = [], t0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= t1:
            return times
        times.append(t)


def test_a_step_up_is_seen_within_two_seconds_and_low_demand_noise_is_not_a_step():
    import numpy as np

    from services.policy.demand import report_due

    rng = np.random.default_rng(7)
    low, high = 1.06, 7.06                       # the square wave of bench/bench_steps.py
    arrivals = poisson_times(rng, low, 0.0, 600.0) + poisson_times(rng, high, 600.0, 615.0)
    est = DemandEstimator()
    out = feed(arrivals, 615.0, est)
    calm = [e for t, e in out if 10.0 <= t < 600.0]
    # ten minutes at 1 req/s: a Poisson clump rarely looks like a step (here a handful of
    # controller steps, the estimate under 2.5x the rate 99 % of the time)
    assert est.jumps <= 6
    assert sum(e > 2.5 * low for e in calm) < 0.01 * len(calm)
    seen = next(t for t, e in out if t >= 600.0 and e >= 0.6 * high)
    assert seen - 600.0 <= 2.0                   # the 5 s window and the average alone: > 4 s
    slow = DemandEstimator(rise_window_s=None)
    out_slow = feed(arrivals, 615.0, slow)
    assert next(t for t, e in out_slow if t >= 600.0 and e >= 0.6 * high) - 600.0 > 3.0
    # the reporter: early when the arrivals since its last report jump, else once a period
    assert report_due(10.3, 10.0, 4, rate=1.0, period_s=1.0)          # 4 in 0.3 s at 1/s
    assert not report_due(10.3, 10.0, 1, rate=1.0, period_s=1.0)
    assert not report_due(10.3, 10.0, 12, rate=40.0, period_s=1.0)    # as expected at 40/s
    assert report_due(11.0, 10.0, 0, rate=1.0, period_s=1.0)


def test_plans_settle_a_dwell_but_for_rises_beyond_capacity_and_no_drift_back_under_a_recent_peak():
    pol = policy(replan_threshold=0.15, cooldown_s=15.0, min_dwell_s=5.0, peak_hold_s=30.0)
    low = pol.decide(WORKERS, 1.0, None, now=0.0)
    cap = pol.planned_capacity
    assert cap == low.capacity_qps and cap > pol.planned_demand * 0.99
    # a rise within the plan's capacity waits for the dwell; beyond it, at once
    within = 0.99 * cap
    assert pol.target_demand(within) > pol.planned_demand * 1.15
    assert not pol.should_replan(WORKERS, within, now=1.0)
    assert pol.should_replan(WORKERS, within, now=5.5)
    assert pol.should_replan(WORKERS, 1.2 * cap, now=1.0)
    # a peak: plan for it, then demand falls back for 20 s (< peak_hold_s)
    peak = pol.decide(WORKERS, 6.0, low, now=10.0)
    for t in range(11, 31):
        assert not pol.should_replan(WORKERS, 1.0, now=float(t))   # cooldown and age passed at 26 s, yet held
    assert pol.held_demand(1.0, 31.0) == 6.0
    # a re-plan for another reason (workers changed) still plans for the peak, not the estimate
    again = pol.decide(WORKERS, 1.0, peak, now=31.0)
    assert again.expected_accuracy == pytest.approx(peak.expected_accuracy, abs=1e-6)
    # 30 s after the peak it is forgotten: the plan goes back down
    assert pol.should_replan(WORKERS, 1.0, now=50.0)
    calm = pol.decide(WORKERS, 1.0, again, now=50.0)
    assert calm.expected_accuracy > again.expected_accuracy
    # off by default: the estimate alone, no dwell
    plain = policy()
    plain.decide(WORKERS, 6.0, None, now=0.0)
    assert plain.held_demand(1.0, 1.0) == 1.0


def test_spilled_batches_of_a_burst_variant_do_not_calibrate_it():
    from services.policy.calibration import Timing

    pol = policy(burst=True)
    plan = pol.decide(WORKERS, 1.0, None, now=0.0)
    task, burst = next((t, v) for t, v in plan.burst.items()
                       if v not in {w.variant for w in plan.workers.values() if w.task == t})
    base = pol.profile.task(task).variant(burst).latency_ms[1].p50_ms
    pol.observe_timings([Timing(task, burst, 1, 20, 20 * 15.0 * base)])   # a spilled batch's "time"
    planned = plan.workers["det-0"]
    own = pol.profile.task("det").variant(planned.variant).latency_ms[planned.batch_size].p50_ms
    pol.observe_timings([Timing("det", planned.variant, planned.batch_size, 20, 20 * 1.5 * own)])
    factors = pol.calibrator.factors()
    assert factors[("det", planned.variant)] == pytest.approx(1.5, rel=0.01)
    # the burst variant gets the host factor (that of what was measured), not 15x
    assert factors[(task, burst)] == pytest.approx(1.5, rel=0.01)


def test_calibration_drift_alone_waits_for_its_dwell_unless_the_plan_runs_slower_than_planned():
    from services.policy.calibration import Timing

    pol = policy(min_dwell_s=5.0, calibration_dwell_s=15.0)
    plan = pol.decide(WORKERS, 1.0, None, now=0.0)
    det = plan.workers["det-0"]
    fast = next(v for v in pol.profile.task("det").variants if v.name != det.variant)   # not planned
    b = min(fast.latency_ms)
    pol.observe_timings([Timing("det", fast.name, b, 20, 20 * 0.5 * fast.latency_ms[b].p50_ms)])   # 2x faster
    assert pol.calibrator.needs_replan()
    assert not pol.should_replan(WORKERS, 1.0, now=6.0)        # past min_dwell_s, not 15 s
    assert pol.should_replan(WORKERS, 2.0 * pol.planned_capacity, now=6.0)   # beyond capacity: at once
    assert pol.should_replan(WORKERS, 1.0, now=15.0)
    # a variant the plan runs measured 2x slower: the plan carries less than it says, re-plan
    # after min_dwell_s
    base = pol.profile.task("det").variant(det.variant).latency_ms[det.batch_size].p50_ms
    pol.observe_timings([Timing("det", det.variant, det.batch_size, 20, 20 * 2.0 * base)])
    assert not pol.should_replan(WORKERS, 1.0, now=4.0)
    assert pol.should_replan(WORKERS, 1.0, now=6.0)


def test_the_front_door_reporter_reports_once_a_period_and_at_once_on_a_jump():
    from services.policy.demand import DemandReporter

    r = DemandReporter(period_s=1.0)
    assert r.due(0.0, 0)                                   # first check
    times = [round(0.1 * k, 6) for k in range(1, 51)]      # 1 req/s for 5 s: periodic only
    due = [t for t in times if r.due(t, int(t))]
    assert due == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not r.due(5.1, 5)                               # nothing new, 0.1 s later
    assert r.due(5.3, 5 + 6)                               # 6 in 0.3 s at 1 req/s: a jump, early
    assert (r.last_ts, r.last_n) == (5.3, 11)


def test_parked_pool_workers_get_the_model_the_step_plan_gives_them_as_standby():
    """At low demand a pool of 4 parks workers; each parked one is named the task/variant
    it runs in the plan for a step to the pool's full-accuracy capacity, and the plan made
    when that step comes gives it exactly that model, so its standby slot is warm."""
    pool = [RegisteredWorker(f"w{i}", f"h:{i}", None) for i in range(4)]
    pol = policy(standby=True, burst=True, headroom_low=1.25)
    low = pol.decide(pool, 0.5, None, now=0.0)
    parked = [w.worker_id for w in pool if w.worker_id not in low.workers]
    assert parked, "the test needs a plan that parks workers"
    assert set(low.standby) == set(parked)
    validate_plan(low, SPEC)
    cap = pol.full_capacity_qps
    step = pol.decide(pool, cap, low, now=1.0)
    for wid in parked:
        a = step.workers[wid]
        assert low.standby[wid] == f"{a.task}/{a.variant}"
    assert step.standby == {}          # nobody parked at full capacity
    # off (the default): parked workers hold nothing
    assert policy().decide(pool, 0.5, None, now=0.0).standby == {}


def test_a_standby_model_counts_as_loaded_when_the_next_plan_binds_workers():
    """Binding treats a parked worker's standby as the model it runs: a plan that needs
    that variant gives it to that worker, not to one that would have to load it."""
    from services.common.plan import Plan, WorkerAssignment
    pool = [RegisteredWorker(f"w{i}", f"h:{i}", None) for i in range(3)]
    prev = Plan(version=1, pipeline="ocr",
                workers={"w0": WorkerAssignment("w0", "h:0", "det", "det_v6small_640", 2)},
                routing={}, standby={"w1": "rec/rec_v6small", "w2": "det/det_v6tiny_320"})
    warm = PlannerPolicy.with_standby(prev, pool)
    assert warm.workers["w2"] == WorkerAssignment("w2", "h:2", "det", "det_v6tiny_320", 1)
    assert warm.workers["w1"].variant == "rec_v6small" and warm.workers["w0"] == prev.workers["w0"]
    assert PlannerPolicy.with_standby(Plan(version=1, pipeline="ocr", workers={}, routing={}), pool).workers == {}


def test_with_a_sharing_table_the_calibrator_is_told_the_load_the_plan_runs_at():
    """A profile with a sharing table: the plan's busy workers per device reach the
    calibrator (so measured batch times are not read as a slower host on top of the
    factor the planner already applied), and PIPESERVE_WORKERS_PER_GPU reaches the solve."""
    d = ocr_like_profile_dict()
    d["sharing"] = {"test": {"1": 1.0, "2": 1.3, "3": 1.8}}
    pool = [RegisteredWorker(f"w{i}", f"h:{i}", None) for i in range(3)]
    pol = PlannerPolicy(parse_profile(d, source="test"), SPEC.slo_ms)
    plan = pol.decide(pool, 6.0, None, now=0.0)
    assert plan is not None and len(plan.workers) >= 2
    assert pol.calibrator.busy == len(plan.workers)
    seen = []
    pol2 = PlannerPolicy(parse_profile(d, source="test"), SPEC.slo_ms, workers_per_device=1,
                         solver=lambda ctx, prev: seen.append(ctx.workers_per_device) or __import__(
                             "services.planner", fromlist=["solve"]).solve(ctx, prev))
    pol2.decide(pool, 6.0, None, now=0.0)
    assert seen and set(seen) == {1}


def test_the_controller_reads_workers_per_gpu_from_the_environment(monkeypatch):
    from services.controller.main import parse_config as parse_args
    monkeypatch.setenv("PIPESERVE_WORKERS_PER_GPU", "2")
    assert parse_args(["--spec", "pipelines/ocr.yaml", "--profile", "profiles/ocr_cpu.json"]).workers_per_device == 2
    monkeypatch.setenv("PIPESERVE_WORKERS_PER_GPU", "two")
    with pytest.raises(SystemExit):
        parse_args(["--spec", "pipelines/ocr.yaml", "--profile", "profiles/ocr_cpu.json"])
