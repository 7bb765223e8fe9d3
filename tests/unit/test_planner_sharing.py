"""Workers sharing a device: the measured factor is read sanely and the planner plans on it."""
from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.plan import RegisteredWorker
from services.planner import sharing
from services.planner.assign import plan_from_solution
from services.planner.profile import parse_profile
from services.planner.solver import PlannerContext, solve
from services.planner.verify import check_solution
from tests.unit.ocr_like_profile import ocr_like_profile_dict


def profile_with(table: dict | None, device: str = "test"):
    d = ocr_like_profile_dict()
    if table is not None:
        d["sharing"] = {device: {str(k): f for k, f in table.items()}}
    return parse_profile(d, "ocr")


# -- reading a table ------------------------------------------------------------------

def test_factor_interpolates_and_extrapolates_as_processor_sharing():
    t = {1: 1.0, 2: 1.2, 4: 2.0}
    assert sharing.factor(t, 1) == 1.0
    assert sharing.factor(t, 0) == 1.0
    assert sharing.factor(t, 2) == 1.2
    assert sharing.factor(t, 3) == pytest.approx(1.6)        # 1.2 + 0.5 * (2.0 - 1.2)
    assert sharing.factor(t, 8) == pytest.approx(4.0)        # 2.0 * 8 / 4: no throughput past k = 4


def test_factor_is_non_decreasing_and_k1_implicit():
    t = {2: 1.3, 3: 1.1, 4: 2.0}                             # 3 measured under 2: noise
    assert sharing.factor(t, 3) == pytest.approx(1.3)
    assert sharing.factor(t, 1.5) == pytest.approx(1.15)     # from the implicit k = 1 point
    ks = [sharing.factor(t, k) for k in range(1, 10)]
    assert ks == sorted(ks)


def test_busy_on_device_packs_densely():
    assert sharing.busy_on_device(5, None) == 5
    assert sharing.busy_on_device(5, 2) == 2
    assert sharing.busy_on_device(1, 2) == 1


def test_candidates():
    # one device (a host): caps 1..min(N, last measured k)
    assert sharing.candidates(3, None, 4) == [(1, 1), (2, 2), (3, 3)]
    assert sharing.candidates(20, None, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    # 4 GPUs x 2 workers: caps 1..2 on one device, then the whole cluster at k = 2
    assert sharing.candidates(8, 2, 4) == [(1, 1), (2, 2), (8, 2)]
    with pytest.raises(ValueError, match="workers_per_device"):
        sharing.candidates(8, 0, 4)
    # a plan keeps one worker per stage anyway: caps start there
    assert sharing.candidates(6, None, 4, n_min=2) == [(2, 2), (3, 3), (4, 4)]
    assert sharing.candidates(6, None, 2, n_min=3) == [(3, 3)]
    assert sharing.candidates(0, None, 4) == [(0, 0)]


def test_shared_profile_scales_only_the_tables_device():
    d = ocr_like_profile_dict()
    d["tasks"][1]["variants"][0]["device"] = "gpu"          # rec_v6tiny on another device
    d["sharing"] = {"test": {"1": 1.0, "2": 1.5}}
    p = parse_profile(d, "ocr")
    s = sharing.shared_profile(p, 2)
    assert s.sharing == {}
    assert s.task("det").variant("det_v6tiny_320").latency(1, "p50") == pytest.approx(30.0 * 1.5)
    assert s.task("rec").variant("rec_v6tiny").latency(1, "p50") == pytest.approx(5.0)   # no table for "gpu"
    assert sharing.variant_factors(p, 2) == {v: 1.5 for v in ("det_v6tiny_320", "det_v6small_320",
                                                              "det_v6small_480", "det_v6small_640", "rec_v6small")}


# -- planning on it -------------------------------------------------------------------

def _fields(sol):
    return (sol.ok, sol.mode, sol.status, sol.served_qps, sol.expected_accuracy, sol.workers_used,
            sol.allocations, sol.flows, sol.capacity_qps, dict(sol.lp_bound), sol.solver_calls,
            sol.solver_nodes, sol.solver_iterations, sol.sharing_k, dict(sol.latency_factors))


@pytest.mark.parametrize("demand", [5.0, 40.0, 400.0])
def test_without_a_table_for_its_devices_the_plan_is_unchanged(demand):
    """A table for a device no variant runs on changes nothing: one solve, as without one."""
    plain = solve(PlannerContext(profile_with(None), demand, 6))
    other = solve(PlannerContext(profile_with({1: 1.0, 2: 3.0}, device="elsewhere"), demand, 6))
    assert _fields(plain) == _fields(other)
    assert plain.sharing_k == 0 and not plain.latency_factors


def test_sharing_that_adds_no_throughput_keeps_two_workers():
    """Two busy workers run at half speed each: a third or fourth adds latency, not
    capacity. The planner keeps two (one per task) where without the table it takes six."""
    demand = 400.0
    profile = profile_with({1: 1.0, 2: 2.0})
    plain = solve(PlannerContext(profile_with(None), demand, 6))
    shared = solve(PlannerContext(profile, demand, 6))
    assert plain.ok and shared.ok
    assert plain.workers_used == 6
    assert shared.workers_used == 2 and shared.sharing_k == 2
    assert shared.served_qps < plain.served_qps
    assert set(shared.latency_factors.values()) == {2.0}
    # feasible on the latencies it assumed: every batch at twice the profile's
    assert check_solution(shared, sharing.shared_profile(profile, 2), profile.slo_ms, "p95") == []


def test_a_cheap_share_lets_it_use_more_workers_at_their_shared_speed():
    table = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.2}
    sol = solve(PlannerContext(profile_with(table), 400.0, 4))
    assert sol.ok and sol.workers_used == 4 and sol.sharing_k == 4
    assert sol.n_workers == 4
    assert set(sol.latency_factors.values()) == {1.2}
    # it served less than the unshared plan, by at most the factor
    plain = solve(PlannerContext(profile_with(None), 400.0, 4))
    assert plain.served_qps / 1.2 - 1e-6 <= sol.served_qps < plain.served_qps


def test_low_demand_stops_at_the_first_full_accuracy_plan():
    """At low demand two workers at full accuracy suffice: no bigger cap is tried."""
    sol = solve(PlannerContext(profile_with({1: 1.0, 2: 1.1, 3: 1.6, 4: 2.0}), 2.0, 4))
    assert sol.mode == "hardware" and sol.workers_used == 2 and sol.sharing_k == 2


def test_zero_demand_keeps_a_worker_per_stage():
    """A cap of one worker cannot keep both stages alive: it is not tried (at zero demand
    it would serve everything, by serving nothing, with no worker at all)."""
    sol = solve(PlannerContext(profile_with({1: 1.0, 2: 1.3, 4: 2.9}), 0.0, 3))
    assert sol.ok and sol.workers_used == 2 and sol.sharing_k == 2
    assert {a.task for a in sol.allocations} == {"det", "rec"}


def test_several_devices_scale_by_workers_per_device():
    table = {1: 1.0, 2: 1.5}
    ctx = PlannerContext(profile_with(table), 400.0, 8, workers_per_device=2)
    sol = solve(ctx)
    assert sol.ok and sol.sharing_k == 2 and sol.workers_used == 8
    assert set(sol.latency_factors.values()) == {1.5}


def test_the_plan_carries_the_shared_latency_figures():
    p = profile_with({1: 1.0, 2: 2.0})
    sol = solve(PlannerContext(p, 400.0, 6))
    workers = [RegisteredWorker(f"w{i}", f"10.0.0.{i}:9000", "") for i in range(6)]
    plan = plan_from_solution(sol, workers, None, version=1, now=0.0, profile=p)
    for task, per_variant in plan.latency_ms.items():
        for variant, by_batch in per_variant.items():
            base = p.task(task).variant(variant).latency_ms
            assert by_batch == {b: pytest.approx(base[b].p50_ms * 2.0) for b in base}
    assert len(plan.workers) == 2


def test_change_of_table_changes_the_compiled_model_not_the_cache_of_another():
    """Two profiles, one with a table: solving one does not leak into the other."""
    a = solve(PlannerContext(profile_with({1: 1.0, 2: 2.0}), 400.0, 6))
    b = solve(PlannerContext(profile_with(None), 400.0, 6))
    a2 = solve(PlannerContext(replace(profile_with({1: 1.0, 2: 2.0})), 400.0, 6))
    assert _fields(a) == _fields(a2)
    assert b.workers_used == 6


def test_the_compiled_model_caches_stay_bounded():
    """A long-running controller plans on a new calibrated profile object every few
    minutes: the solver's caches keep at most CACHE_SIZE of them, newest kept."""
    from services.planner import solver
    from services.planner.profile import parse_profile
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from ocr_like_profile import ocr_like_profile_dict
    last = None
    for i in range(solver.CACHE_SIZE + 5):
        d = ocr_like_profile_dict()
        d["tasks"][1]["variants"][0]["latency_ms"]["1"]["p50_ms"] = 5.0 + i * 0.01
        last = parse_profile(d, source="test")
        solver.get_model(last, 1500.0, "p95", False)
    assert len(solver._CACHE) <= solver.CACHE_SIZE and len(solver._KEYS) <= solver.CACHE_SIZE
    assert solver.get_model(last, 1500.0, "p95", False) is solver._CACHE[next(reversed(solver._CACHE))]
