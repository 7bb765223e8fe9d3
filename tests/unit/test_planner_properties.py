"""Property tests: every plan the planner emits respects capacity, latency, cluster size
and branch consistency, and becomes a well-formed Plan."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.plan import ANY_PATH, RegisteredWorker
from services.planner.assign import plan_from_solution
from services.planner.solver import PlannerContext, solve
from services.planner.synthetic import synthetic_profile
from services.planner.verify import check_solution

SHAPES = [[None, 0], [None, 0, 0], [None, 0, 1], [None, 0, 0, 1]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(SHAPES), variants=st.integers(2, 3), seed=st.integers(0, 10_000),
       n_workers=st.integers(3, 40), demand=st.floats(0.0, 3000.0), method=st.sampled_from(["relaxed", "exact"]))
def test_every_plan_is_sound(shape, variants, seed, n_workers, demand, method):
    p = synthetic_profile(shape, variants, seed=seed, slo_ms=300.0, name=f"p{seed}")
    sol = solve(PlannerContext(p, demand, n_workers, method=method))
    if not sol.ok:
        assert sol.status == "no_configuration" or sol.mode == "failed"
        return
    assert check_solution(sol, p) == []
    assert sol.workers_used <= n_workers
    assert sol.served_qps <= demand + 1e-6
    assert sol.mode in ("hardware", "accuracy", "overload")
    if sol.mode != "overload":
        assert math.isclose(sol.served_qps, demand, rel_tol=1e-3, abs_tol=1e-3)
    # every stage keeps at least one worker when the cluster allows it
    if n_workers >= len(p.tasks):
        assert {a.task for a in sol.allocations} == {t.name for t in p.tasks}
    workers = [RegisteredWorker(f"{t.name}-{i}", f"h:{i}", t.name) for t in p.tasks for i in range(n_workers)]
    plan = plan_from_solution(sol, workers, None, version=3, now=100.0)
    assert plan.version == 3 and plan.created_unix_s == 100.0
    assert len(plan.workers) == sol.workers_used
    for task, table in plan.routing.items():
        assert ANY_PATH in table
        for path, weights in table.items():
            assert abs(sum(weights.values()) - 1.0) < 1e-9
            assert all(plan.workers[w].task == task for w in weights)
