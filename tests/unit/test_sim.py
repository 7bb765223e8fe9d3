"""The simulator: determinism, accounting, the batching fast path, and a closed form."""
import math

import numpy as np
import pytest

from services.planner import load_profile, parse_profile
from services.sim import SimConfig, make_policy, poisson_arrivals, simulate, trace_arrivals
from services.common.plan import Allocation
from services.sim.metrics import DROPPED, LATE, OK, SHED
from services.sim.policies import Policy

TRAFFIC = load_profile("profiles/traffic_analysis.json")


def one_stage(latency_ms: float, slo_ms: float = 10_000.0, batches=(1,)):
    return parse_profile({"name": "one", "slo_ms": slo_ms, "tasks": [{"name": "t", "variants": [
        {"name": "v", "accuracy": 0.9,
         "latency_ms": {str(b): {"p50_ms": latency_ms * b, "p95_ms": latency_ms * b} for b in batches}}]}]})


def run(policy="ours", rate=60.0, duration=20.0, seed=3, **cfg):
    arr = poisson_arrivals(rate, duration, seed)
    return simulate(TRAFFIC, arr, make_policy(policy, TRAFFIC, cfg.pop("n_workers", 20)),
                    SimConfig(seed=seed, **cfg))


def test_same_seed_same_results_other_seed_other_results():
    a, b = run(), run()
    assert np.array_equal(a.status, b.status)
    assert np.array_equal(a.accuracy, b.accuracy, equal_nan=True)
    assert np.array_equal(a.latency_s, b.latency_s, equal_nan=True)
    assert a.queries == b.queries and a.batches == b.batches
    c = run(seed=4)
    assert not np.array_equal(a.latency_s[:100], c.latency_s[:100], equal_nan=True)


def test_every_request_gets_exactly_one_outcome():
    r = run(policy="inferline", rate=400.0, duration=10.0)
    counts = {s: r.count(s) for s in (OK, LATE, DROPPED, SHED)}
    assert sum(counts.values()) == r.requests
    assert r.violation_ratio == pytest.approx(1 - counts[OK] / r.requests)
    ok = r.status == OK
    assert np.all(r.latency_s[ok] <= TRAFFIC.slo_ms / 1000 + 1e-9)
    assert np.all((r.accuracy[ok] > 0.5) & (r.accuracy[ok] <= 1.0))
    assert np.all(np.isnan(r.accuracy[~ok]))


def test_overload_sheds_at_admission_with_accuracy_scaling():
    r = run(policy="ours", rate=2500.0, duration=5.0)
    assert r.count(SHED) > 0              # beyond what the cheapest variants carry
    assert r.effective_accuracy < 0.9     # accuracy scaled down


def test_fan_out_follows_the_integer_recipe():
    """floor((i+1)m) - floor(im) summed over n frames is floor(n m): per-request sub-query
    counts average the profile's mean exactly."""
    r = run(policy="clipper-high", rate=20.0, duration=20.0, slo_ms=60_000.0)   # nothing dropped
    fan = TRAFFIC.task("object_detection").fan_out["yolov5x"]
    n = r.requests
    assert r.count(OK) == n
    expect = n + math.floor(n * fan["car_classification"]) + math.floor(n * fan["facial_recognition"])
    assert r.queries == expect


def test_queueing_delay_matches_md1():
    """One stage, batch size 1, deterministic 10 ms service, Poisson arrivals at rho = 0.6:
    the mean wait is rho / (2 mu (1 - rho)) = 0.6 * 0.01 / 0.8 = 7.5 ms."""
    prof = one_stage(10.0)
    arr = poisson_arrivals(60.0, 600.0, seed=11)
    r = simulate(prof, arr, make_policy("clipper-high", prof, 1),
                 SimConfig(n_workers=1, seed=1, latency_jitter=False))
    assert r.count(OK) == r.requests
    wait = float(np.mean(r.latency_s)) - 0.010
    assert wait == pytest.approx(0.0075, rel=0.1)


def test_early_dropping_ablation_never_drops():
    a = run(policy="ours-no-drop", rate=300.0, duration=10.0)
    assert a.count(DROPPED) == 0 and a.queries_dropped == 0


def test_trace_replay_uses_the_brief_recipe():
    arr = trace_arrivals("traces/twitter_medium_normal.txt", 4.5, 1)
    assert arr.size == 36046     # brief section 5
    assert np.all(np.diff(arr) >= 0)


def test_effective_capacity_needs_every_lower_demand_within_the_limit():
    from services.sim.experiments import effective_capacity

    rates = [50, 100, 150, 200, 300]
    viol = [0.0, 0.004, 0.03, 0.002, 0.0]          # 150 req/s breaks the 1 % limit
    assert effective_capacity(rates, viol, 0.01) == 100
    assert effective_capacity(rates, viol, 0.05) == 300
    assert effective_capacity(rates, [0.2] + viol[1:], 0.01) == 0.0


class _SwitchAt(Policy):
    """Variant ``first`` until ``at_s``, then ``then`` (one worker, batch 1)."""
    name = "switch"

    def __init__(self, profile, at_s, first="a", then="b"):
        super().__init__(profile, 1)
        self.at_s, self.first, self.then, self.current = at_s, first, then, None

    def decide(self, obs):
        want = self.first if obs.now < self.at_s else self.then
        if want == self.current:
            return None
        self.current = want
        return self._plan_from_allocs([Allocation("t", want, 1, 1)], {("t", want, 1): 1.0},
                                      obs.current, obs.now, "test")


def two_variants(load_s: float):
    return parse_profile({"name": "two", "slo_ms": 500.0, "tasks": [{"name": "t", "variants": [
        {"name": name, "accuracy": acc, "load_s": load_s,
         "latency_ms": {"1": {"p50_ms": 10.0, "p95_ms": 10.0}}} for name, acc in (("a", 0.5), ("b", 0.9))]}]})


def test_a_swap_within_a_task_keeps_serving_with_the_old_variant():
    """As the worker does it (services/worker/core.py): while the new variant loads
    (5 s here, far beyond the 500 ms SLO) the old one serves every arrival; then the
    new one takes over."""
    prof = two_variants(load_s=5.0)
    arr = np.arange(0.05, 10.0, 0.1)                     # 10 req/s, well within capacity
    r = simulate(prof, arr, _SwitchAt(prof, at_s=2.0), SimConfig(n_workers=1, seed=0, latency_jitter=False))
    assert r.count(OK) == r.requests
    before_ready = arr < 7.0 - 1e-9                      # plan at t=2 s + 5 s load
    assert np.all(r.accuracy[before_ready] == 0.5)
    assert np.all(r.accuracy[arr > 7.1] == 0.9)


def test_the_inlined_rerouting_estimate_decides_like_expected_finish(monkeypatch):
    """``_Sim._reroute`` inlines ``_Worker.expected_finish`` for speed; a run with the
    plain formula gives the same outcome for every request."""
    from services.policy.routing import reroute_choice
    from services.sim import engine

    fast = run(policy="ours", rate=250.0, duration=8.0)

    calls = []

    def plain(self, ti, w, c, now, deadline):
        calls.append(1)
        finish = {x: x.expected_finish(now, c) for x in self.by_task[ti] if x.active}
        finish.setdefault(w, w.expected_finish(now, c))
        return reroute_choice(w, finish, deadline, w.reserve, self.reroute_slack)

    monkeypatch.setattr(engine._Sim, "_reroute", plain)
    slow = run(policy="ours", rate=250.0, duration=8.0)
    assert len(calls) > 100                  # the run does consider moving groups
    assert np.array_equal(fast.status, slow.status)
    assert np.array_equal(fast.latency_s, slow.latency_s, equal_nan=True)


def test_burst_variants_absorb_a_square_wave_step_that_a_re_plan_cannot():
    from services.loadgen.schedule import RateShape
    from services.sim.arrivals import shape_arrivals
    arr = shape_arrivals(RateShape("square", rate=60.0, peak_rate=420.0, period_s=30.0, duty=0.5), 60.0, 5)
    with_spill = simulate(TRAFFIC, arr, make_policy("ours", TRAFFIC, 20), SimConfig(n_workers=20, seed=5))
    without = simulate(TRAFFIC, arr, make_policy("ours-no-spill", TRAFFIC, 20), SimConfig(n_workers=20, seed=5))
    assert without.violation_ratio > 0.02                          # the step outruns re-planning
    assert with_spill.violation_ratio < 0.5 * without.violation_ratio
    assert with_spill.effective_accuracy < without.effective_accuracy   # bought with accuracy


def test_a_hop_delay_adds_to_every_stage_and_zero_changes_nothing():
    base = run(rate=40.0, duration=10.0)
    zero = run(rate=40.0, duration=10.0, hop_s=0.0)
    assert np.array_equal(base.latency_s, zero.latency_s, equal_nan=True)
    slow = run(rate=40.0, duration=10.0, hop_s=0.01)
    ok = (base.status == OK) & (slow.status == OK)
    # two stages on every path: at least two hops more per request, on the median
    assert np.median(slow.latency_s[ok] - base.latency_s[ok]) >= 0.02 - 1e-9


def test_task_bound_workers_stay_on_their_task():
    from services.sim.policies import OursPolicy
    bound = {"object_detection": 12, "car_classification": 4, "facial_recognition": 4}
    arr = poisson_arrivals(150.0, 20.0, 2)
    r = simulate(TRAFFIC, arr, OursPolicy(TRAFFIC, 20, task_bound=bound), SimConfig(n_workers=20, seed=2))
    per_task: dict[str, np.ndarray] = {}
    for name, col in r.variant_mix.items():       # workers per variant per tick
        task = name.split(":")[0]
        per_task[task] = per_task.get(task, 0) + np.asarray(col)
    assert set(per_task) == set(bound)
    assert all(int(per_task[t].max()) <= k for t, k in bound.items())
    with pytest.raises(ValueError, match="add up"):
        OursPolicy(TRAFFIC, 20, task_bound={"object_detection": 3})


class _ParkAndBack(Policy):
    """Two workers: both on ``a`` until 2 s, then w0001 parks (with ``standby``, if given,
    named for it) until 10 s, then it comes back on ``b`` beside w0000 on ``a``."""
    name = "park-and-back"

    def __init__(self, profile, standby=None):
        super().__init__(profile, 2)
        self.standby, self.phase = standby, None

    def decide(self, obs):
        from dataclasses import replace
        phase = 0 if obs.now < 2.0 else (1 if obs.now < 10.0 else 2)
        if phase == self.phase:
            return None
        self.phase = phase
        allocs = {0: [Allocation("t", "a", 1, 2)], 1: [Allocation("t", "a", 1, 1)],
                  2: [Allocation("t", "a", 1, 1), Allocation("t", "b", 1, 1)]}[phase]
        d = self._plan_from_allocs(allocs, {("t", a.variant, 1): 1.0 for a in allocs}, obs.current, obs.now, "test")
        if phase == 1:
            parked = next(w for w in ("w0000", "w0001") if w not in d.plan.workers)
            d = replace(d, plan=replace(d.plan, standby={parked: self.standby} if self.standby else {}))
        return d


def test_a_parked_worker_frees_its_model_and_a_standby_makes_its_return_free():
    """The live model (park_linger_s): a worker parked at 2 s frees its model 3 s later, so
    coming back at 10 s on ``b`` costs a 4 s load (no answer from ``b`` before 14 s); with
    ``b`` named as its standby it loaded meanwhile and answers from 10 s."""
    prof = two_variants(load_s=4.0)
    arr = np.arange(0.05, 20.0, 0.05)
    window = (arr > 10.5) & (arr < 13.5)

    def b_answers(policy, **cfg):
        r = simulate(prof, arr, policy, SimConfig(n_workers=2, seed=0, latency_jitter=False, **cfg))
        return int(np.sum((r.status[window] == OK) & (r.accuracy[window] == 0.9)))

    assert b_answers(_ParkAndBack(prof), park_linger_s=3.0) == 0
    assert b_answers(_ParkAndBack(prof, standby="t/b"), park_linger_s=3.0) > 20
    assert b_answers(_ParkAndBack(prof, standby="t/a"), park_linger_s=3.0) == 0   # the wrong standby: a load
