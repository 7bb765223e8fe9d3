"""The planner: profiles in, versioned plans out. Pure policy (no gRPC, no Redis).

    from services.planner import PlannerContext, solve, plan_from_solution, load_profile
    sol = solve(PlannerContext(profile, demand_qps=120.0, n_workers=18), previous_plan)
    plan = plan_from_solution(sol, registered_workers, previous_plan, version=previous.version + 1)
"""
from services.planner.assign import plan_from_solution
from services.planner.profile import PipelineProfile, load_profile, parse_profile, write_profile
from services.planner.solver import PathFlow, PlannerContext, PlanSolution, solve
from services.planner.verify import check_solution

__all__ = ["PathFlow", "PipelineProfile", "PlanSolution", "PlannerContext", "check_solution",
           "load_profile", "parse_profile", "plan_from_solution", "solve", "write_profile"]
