"""From a solution to a Plan: worker ids, minimal moves, path-keyed routing, admission."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.common.plan import ANY_PATH, Plan, RegisteredWorker, validate_plan
from services.common.spec import parse_spec
from services.planner.assign import plan_from_solution
from services.planner.profile import load_profile
from services.planner.solver import PlannerContext, solve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def traffic():
    return load_profile(ROOT / "profiles" / "traffic_analysis.json")


def spec_for(profile):
    return parse_spec({"name": profile.name, "slo_ms": profile.slo_ms, "tasks": [
        {"name": t.name, "children": list(t.children),
         "variants": [{"name": v.name, "model": f"{v.name}.onnx", "processor": "x"} for v in t.variants]}
        for t in profile.tasks]})


def pool(profile, per_task=18):
    return [RegisteredWorker(f"{t.name[:3]}{i:02d}", f"10.0.0.{i}:9000", t.name)
            for t in profile.tasks for i in range(per_task)]


def test_plan_is_valid_and_routes_by_upstream_path(traffic):
    sol = solve(PlannerContext(traffic, 400.0, 18))
    plan = plan_from_solution(sol, pool(traffic), None, version=1, now=5.0)
    validate_plan(plan, spec_for(traffic))
    assert plan.expected_accuracy == pytest.approx(sol.expected_accuracy)
    assert plan.capacity_qps >= sol.served_qps - 1e-6
    assert plan.admission_rate_qps is None and plan.source.startswith("planner:relaxed")
    assert set(plan.routing["object_detection"]) == {"", ANY_PATH}
    detectors = {f.variants[0] for f in sol.flows}
    # children are routed per detector variant; queries from a detector only reach
    # classifier workers the plan foresaw for that detector
    assert detectors <= set(plan.routing["car_classification"]) - {ANY_PATH}
    for det in detectors:
        planned = {(f.variants[1], f.batches[1]) for f in sol.flows
                   if f.variants[0] == det and f.tasks[1] == "car_classification"}
        for wid in plan.routing["car_classification"][det]:
            w = plan.workers[wid]
            assert (w.variant, w.batch_size) in planned


def test_root_weights_follow_the_split(traffic):
    sol = solve(PlannerContext(traffic, 400.0, 18))
    plan = plan_from_solution(sol, pool(traffic), None, version=1)
    share = {}
    for wid, x in plan.routing["object_detection"][""].items():
        share[plan.workers[wid].variant] = share.get(plan.workers[wid].variant, 0.0) + x
    planned = {}
    for f in sol.flows:
        if f.tasks[1] == "car_classification":
            planned[f.variants[0]] = planned.get(f.variants[0], 0.0) + f.rate_qps / sol.served_qps
    assert share == pytest.approx(planned)


def test_replanning_moves_few_workers(traffic):
    workers = pool(traffic)
    ctx = lambda d: PlannerContext(traffic, d, 18)
    first = plan_from_solution(solve(ctx(300.0)), workers, None, version=1)
    same = plan_from_solution(solve(ctx(300.0), first), workers, first, version=2)
    # the change cost is per variant (a model load); a batch-size change is free
    assert {k: w.variant for k, w in same.workers.items()} == {k: w.variant for k, w in first.workers.items()}
    nearby = plan_from_solution(solve(ctx(320.0), first), workers, first, version=3)
    moved = sum(1 for k, w in nearby.workers.items()
                if k not in first.workers or first.workers[k].variant != w.variant)
    assert moved <= 4


def test_failed_solution_keeps_previous(traffic, monkeypatch):
    first = plan_from_solution(solve(PlannerContext(traffic, 100.0, 18)), pool(traffic), None, version=1)
    from services.planner.solver import get_model
    m = get_model(traffic, 250.0, "p95", False)
    monkeypatch.setattr(m, "run", lambda *a: "infeasible")
    sol = solve(PlannerContext(traffic, 100.0, 18), first)
    assert not sol.ok
    assert plan_from_solution(sol, pool(traffic), first, version=2) is first


def test_overload_sets_admission(traffic):
    sol = solve(PlannerContext(traffic, 1e5, 18))
    plan = plan_from_solution(sol, pool(traffic), None, version=1)
    assert sol.mode == "overload" and plan.admission_rate_qps == pytest.approx(sol.served_qps)
    assert Plan.from_json(plan.to_json()).admission_rate_qps == pytest.approx(sol.served_qps)
