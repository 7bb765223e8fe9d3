"""``solve(context, previous_plan) -> PlanSolution``: the planner's pure policy.

Lexicographic objective, as three solves of one compiled problem (weights and floors
are parameters):

1. maximise the served rate ``s`` (``s < D`` only when even the cheapest variants
   cannot carry the demand: **overload**, the rest is shed at admission);
2. maximise the expected accuracy mass ``sum_k x_k A(k)`` with ``s`` held;
3. minimise active workers + ``change_cost`` per worker that must load a variant it
   did not run in the previous plan, holding ``s`` and the accuracy (up to
   ``accuracy_tolerance``).

If all of ``s = D`` fits on the most accurate paths the result is **hardware scaling**
(fewest workers at full accuracy), otherwise **accuracy scaling**. The mode is read off
the solution, never decided by an exception.

``method="exact"`` solves the MILP (integer replicas, binary batch choice). The default
``"relaxed"`` solves the LP, then repairs: one batch size per variant with children
(the one carrying most replicas), floor + largest fractional parts within the cluster
size, then the three phases again with replicas bounded by the rounded values and a
final ceil. Every status is checked against cvxpy's constants; a failed solve returns
``ok=False`` and the caller keeps its previous plan.

Workers sharing a device (a profile with a ``sharing`` table, :mod:`services.planner.sharing`):
how many workers are busy is an outcome of the solve, and their speed depends on it. So
the problem is solved once per cap ``n`` on busy workers (``sharing.candidates``), with
latencies scaled by the measured factor of ``n`` (on the busiest device), and the best
plan kept: most served, then most accurate, then fewest workers. The caps go up from the
workers every stage keeps anyway (``min_workers_per_task`` each) and stop at the first plan that serves everything at full accuracy: a bigger cap only
makes every worker slower (factors never decrease), so it cannot beat that plan, and any
plan of no more workers was open to the smaller cap already. Without a table: one solve,
exactly as before.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import cvxpy as cp
import numpy as np

from services.common.plan import Allocation, Plan
from services.planner.model import PlanningModel, SolveLimits
from services.planner import sharing
from services.planner.profile import PipelineProfile
from services.planner.verify import check_solution

OK_STATUSES = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.USER_LIMIT)
EPS = 1e-6


@dataclass(frozen=True)
class PlannerContext:
    profile: PipelineProfile
    demand_qps: float
    n_workers: int
    slo_ms: float | None = None               # default: the profile's SLO
    method: str = "relaxed"                   # "relaxed" (LP + repair) or "exact" (MILP)
    latency_quantile: str = "p95"             # latencies and throughputs use p95 by default
    node_limit: int = 5_000                   # branch-and-bound nodes per MILP call (not wall-clock:
    iteration_limit: int = 1_000_000          # a run's result must not depend on the machine's speed)
    time_limit_s: float = 60.0                # per call: a safety net, never meant to be reached
    mip_rel_gap: float = 1e-3
    change_cost: float = 0.25                 # workers-equivalent per worker that loads a new variant
    accuracy_tolerance: float = 1e-6          # relative accuracy phase 3 may give up
    min_accuracy: float | None = None         # floor on the expected accuracy of what is served
    task_workers: Mapping[str, int] | None = None   # per-task worker caps (task-bound workers)
    min_workers_per_task: int = 1             # keep every stage alive, even at zero demand
    leaf_pruning: bool = True
    repair_node_limit: int = 200              # per phase of the widened repair MILP (relaxed)
    workers_per_device: int | None = None     # with a sharing table: most workers on one device
                                              # (None: they all share one, a single host)
    clock: Callable[[], float] = time.perf_counter   # only used to report solve time

    @property
    def slo(self) -> float:
        return float(self.slo_ms if self.slo_ms is not None else self.profile.slo_ms)


@dataclass(frozen=True)
class PathFlow:
    tasks: tuple[str, ...]
    variants: tuple[str, ...]
    batches: tuple[int, ...]
    rate_qps: float              # root requests per second on this configuration
    accuracy: float
    mult: tuple[float, ...] = ()  # queries per root request reaching each stage


@dataclass(frozen=True)
class PlanSolution:
    ok: bool
    mode: str                    # hardware | accuracy | overload | failed
    status: str
    pipeline: str
    method: str
    demand_qps: float
    served_qps: float
    expected_accuracy: float | None
    max_accuracy: float
    workers_used: int
    n_workers: int
    allocations: tuple[Allocation, ...] = ()
    flows: tuple[PathFlow, ...] = ()
    capacity_qps: float = 0.0
    lp_bound: Mapping[str, float] = field(default_factory=dict)
    solve_ms: float = 0.0
    message: str = ""
    variant_accuracy: Mapping[str, float] = field(default_factory=dict)   # of the allocated variants
    solver_calls: int = 0
    solver_nodes: int = 0
    solver_iterations: int = 0
    time_limit_hits: int = 0     # calls that reached the wall-clock safety net (should be 0)
    # with a sharing table: busy workers on the busiest device the latencies assume, and the
    # factor each variant's profile latencies were multiplied by (empty: none applied)
    sharing_k: int = 0
    latency_factors: Mapping[str, float] = field(default_factory=dict)

    def replicas(self) -> dict[tuple[str, str, int], int]:
        return {(a.task, a.variant, a.batch_size): a.replicas for a in self.allocations}

    @property
    def admission_rate_qps(self) -> float | None:
        return self.served_qps if self.mode == "overload" else None


# Bounded, least recently used first out: a controller that re-calibrates plans on a new
# profile object (new content) every few minutes for weeks must not keep every compiled
# model it ever made. The simulator's experiments use a few dozen profiles at most.
CACHE_SIZE = 64
_CACHE: "OrderedDict[tuple, PlanningModel]" = OrderedDict()
_KEYS: "OrderedDict[int, tuple[PipelineProfile, str]]" = OrderedDict()


def _remember(cache: OrderedDict, key, value):
    """Put ``key`` in ``cache`` as most recently used, evicting beyond ``CACHE_SIZE``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value


def get_model(profile: PipelineProfile, slo_ms: float, quantile: str, integer: bool,
              leaf_pruning: bool = True) -> PlanningModel:
    """The compiled model, cached per (profile content, SLO, quantile, integrality).
    The cluster size is a parameter, so one compiled model serves every N."""
    held = _KEYS.get(id(profile))
    if held is None or held[0] is not profile:
        held = (profile, profile.key())
    _remember(_KEYS, id(profile), held)
    key = (held[1], float(slo_ms), quantile, integer, leaf_pruning)
    model = _CACHE.get(key)
    if model is None:
        model = PlanningModel(profile, slo_ms, quantile, integer, leaf_pruning)
    return _remember(_CACHE, key, model)


def _previous_counts(m: PlanningModel, previous: Plan | None) -> np.ndarray:
    prev = np.zeros(len(m.variants))
    if previous is not None:
        vix = {v: i for i, v in enumerate(m.variants)}
        for w in previous.workers.values():
            if (w.task, w.variant) in vix:
                prev[vix[(w.task, w.variant)]] += 1
    return prev


@dataclass
class _Work:
    """What a solve cost in solver calls, nodes and iterations (reported on the solution)."""
    calls: int = 0
    nodes: int = 0
    iterations: int = 0
    time_limit_hits: int = 0


def _run(m: PlanningModel, ctx: PlannerContext, work: _Work) -> str:
    st = m.run(SolveLimits(ctx.node_limit, ctx.iteration_limit, ctx.time_limit_s), ctx.mip_rel_gap)
    work.calls += 1
    work.nodes += m.last.nodes
    work.iterations += m.last.iterations
    work.time_limit_hits += int(m.last.time_limit_hit)
    return st


def _phases(m: PlanningModel, ctx: PlannerContext, swap_w: np.ndarray, work: _Work) -> tuple[str, dict]:
    """Run the three lexicographic phases with the parameters already set."""
    floor = float(ctx.min_accuracy or 0.0)
    m.set(w_served=1.0, w_acc=0.0, w_workers=0.0, served_floor=0.0, ratio_floor=floor,
          swap_w=np.zeros(len(m.variants)), w_variant=np.zeros(len(m.variants)))
    st = _run(m, ctx, work)
    if st not in OK_STATUSES or m.served.value is None:
        return f"phase1:{st}", {}
    s = max(float(m.served.value), 0.0)
    s_floor = max(s - EPS * max(1.0, s), 0.0)
    m.set(w_served=0.0, w_acc=1.0, served_floor=s_floor)
    st = _run(m, ctx, work)
    if st not in OK_STATUSES or m.x.value is None:
        return f"phase2:{st}", {}
    a = float(m.accmass.value)
    ratio = max(floor, (a / s) * (1.0 - ctx.accuracy_tolerance) - EPS) if s > EPS else floor
    # tie-break: among equal worker counts prefer accurate variants (worth < 1 worker in total)
    tie = 1e-4 * (1.0 - m.variant_accuracy) / max(1.0, ctx.n_workers / 1000.0)
    m.set(w_acc=0.0, w_workers=1.0, ratio_floor=ratio, swap_w=swap_w, w_variant=tie)
    st = _run(m, ctx, work)
    if (st not in OK_STATUSES or m.r.value is None) and s > EPS:
        # numerically too tight for the MILP (seen at N=1000): give up 0.1% accuracy
        m.set(ratio_floor=max(floor, (a / s) * (1.0 - 1e-3)))
        st = _run(m, ctx, work)
    if st not in OK_STATUSES or m.r.value is None:
        return f"phase3:{st}", {}
    return str(st), {"served": s, "accmass": a}


def _fix_batches(m: PlanningModel, r: np.ndarray) -> np.ndarray:
    """One batch size per variant with children: the one holding most replicas."""
    y_ub = np.ones(len(m.nl))
    for row in range(m.H.shape[0]):
        members = m.H.indices[m.H.indptr[row]:m.H.indptr[row + 1]]
        best = members[int(np.argmax(r[m.nl[members]] * m.thr[m.nl[members]]))]
        y_ub[members] = 0.0
        y_ub[best] = 1.0
    return y_ub


def _round(m: PlanningModel, ctx: PlannerContext, r: np.ndarray) -> np.ndarray:
    """Integer replicas: floors, then +1 by largest fractional part within the caps."""
    r = np.maximum(r, 0.0)
    base = np.floor(r + 1e-6)
    task_of = np.array([m.tasks.index(b.task) for b in m.buckets])
    caps = _task_caps(m, ctx)
    used = np.bincount(task_of, weights=base, minlength=len(m.tasks))
    budget = ctx.n_workers - base.sum()
    for i in np.argsort(-(r - base), kind="stable"):
        if r[i] - base[i] <= 1e-6 or budget < 1:
            break
        if used[task_of[i]] + 1 <= caps[task_of[i]]:
            base[i] += 1
            used[task_of[i]] += 1
            budget -= 1
    return base


def _task_caps(m: PlanningModel, ctx: PlannerContext) -> np.ndarray:
    return _task_caps_of(ctx, m.tasks)


def _task_caps_of(ctx: PlannerContext, tasks: list[str]) -> np.ndarray:
    caps = np.full(len(tasks), float(ctx.n_workers))
    for t, c in (ctx.task_workers or {}).items():
        if t in tasks:
            caps[tasks.index(t)] = float(c)
    return caps


def solve(ctx: PlannerContext, previous_plan: Plan | None = None) -> PlanSolution:
    """Plan replicas, path split and admission for ``ctx.demand_qps``. Pure: no I/O.
    The solution reports the solver work it took (calls, nodes, simplex iterations, and
    calls that reached the wall-clock safety net, which a result must not depend on)."""
    work = _Work()
    if sharing.has_sharing(ctx.profile):
        solution = _solve_shared(ctx, previous_plan, work)
    else:
        solution = _solve(ctx, previous_plan, work)
    return replace(solution, solver_calls=work.calls, solver_nodes=work.nodes,
                   solver_iterations=work.iterations, time_limit_hits=work.time_limit_hits)


_SHARED: "OrderedDict[int, tuple[PipelineProfile, dict[int, PipelineProfile]]]" = OrderedDict()


def _shared(profile: PipelineProfile, k: int) -> PipelineProfile:
    """``sharing.shared_profile``, one object per (profile, k): the compiled-model cache
    keys on the profile object, so a re-solve must hand it the same one."""
    held = _SHARED.get(id(profile))
    if held is None or held[0] is not profile:
        held = (profile, {})
    _remember(_SHARED, id(profile), held)
    if k not in held[1]:
        held[1][k] = sharing.shared_profile(profile, k)
    return held[1][k]


def _solve_shared(ctx: PlannerContext, previous_plan: Plan | None, work: _Work) -> PlanSolution:
    """One solve per cap on busy workers, latencies at that cap's sharing factor; the best
    by :func:`_rank` (see the module docstring for why stopping at full accuracy is safe)."""
    t0 = ctx.clock()
    best: PlanSolution | None = None
    last: PlanSolution | None = None
    kept = np.minimum(float(ctx.min_workers_per_task), _task_caps_of(ctx, [t.name for t in ctx.profile.tasks]))
    for n, k in sharing.candidates(ctx.n_workers, ctx.workers_per_device, sharing.last_measured(ctx.profile),
                                   n_min=int(kept.sum())):
        sub = replace(ctx, profile=_shared(ctx.profile, k), n_workers=n)
        last = replace(_solve(sub, previous_plan, work), sharing_k=k,
                       latency_factors=sharing.variant_factors(ctx.profile, k))
        if last.ok and (best is None or _rank(last) > _rank(best)):
            best = last
        if last.ok and last.mode == "hardware":
            break
    chosen = best if best is not None else last
    return replace(chosen, n_workers=ctx.n_workers, solve_ms=(ctx.clock() - t0) * 1000.0)


def _solve(ctx: PlannerContext, previous_plan: Plan | None, work: _Work) -> PlanSolution:
    t0 = ctx.clock()
    exact = ctx.method == "exact"
    if ctx.method not in ("exact", "relaxed"):
        raise ValueError(f"method must be 'exact' or 'relaxed', got {ctx.method!r}")
    m = get_model(ctx.profile, ctx.slo, ctx.latency_quantile, exact, ctx.leaf_pruning)
    B = len(m.buckets)
    if not m.configs:
        return _failed(ctx, m, "no_configuration", t0, f"no variant path fits SLO/2 = {ctx.slo / 2:g} ms")
    caps = _task_caps(m, ctx)
    task_min = np.minimum(float(ctx.min_workers_per_task), caps)
    if task_min.sum() > ctx.n_workers:
        task_min[:] = 0.0
    swap_w = np.full(len(m.variants), ctx.change_cost if previous_plan is not None else 0.0)
    m.set(demand=max(float(ctx.demand_qps), 0.0), n_workers=float(ctx.n_workers), task_cap=caps,
          task_min=task_min, prev=_previous_counts(m, previous_plan),
          r_lb=np.zeros(B), r_ub=np.full(B, float(ctx.n_workers)), y_ub=np.ones(len(m.nl)))
    status, info = _phases(m, ctx, swap_w, work)
    if not info:
        return _failed(ctx, m, status, t0)
    lp_bound = dict(info)
    integral = exact
    if not exact:
        # repair 1: one batch size per variant with children, then re-plan the LP
        if len(m.nl):
            m.set(y_ub=_fix_batches(m, np.asarray(m.r.value, dtype=float)))
            status, info = _phases(m, ctx, swap_w, work)
        if not info:
            _reset(m)
            return _failed(ctx, m, "repair:" + status, t0)
        # repair 2: integer replicas by a small MILP in a box around the LP's r*: first
        # [floor - 1, ceil + 1] on the buckets the LP uses (others stay empty); if that
        # loses more than 0.1% of served rate or 0.2% of accuracy against the LP bound,
        # also try letting every bucket take one replica (node-limited). If no box
        # works: floor + largest fractional parts.
        r_star = np.maximum(np.asarray(m.r.value, dtype=float), 0.0)
        used = (r_star > 1e-6).astype(float)
        lb = np.maximum(np.floor(r_star + 1e-6) - used, 0.0)
        mi = get_model(ctx.profile, ctx.slo, ctx.latency_quantile, True, ctx.leaf_pruning)
        best = None
        for ub, limit in ((np.ceil(r_star - 1e-6) + used, ctx.node_limit),
                          (np.ceil(r_star - 1e-6) + 1.0, min(ctx.node_limit, ctx.repair_node_limit))):
            mi.set(**{k: p.value for k, p in m.p.items()})
            mi.set(r_lb=lb, r_ub=ub)
            st, inf = _phases(mi, replace(ctx, node_limit=limit, mip_rel_gap=max(ctx.mip_rel_gap, 1e-3)), swap_w, work)
            if inf:
                cand = _extract(ctx, mi, st, lp_bound, t0, integral=True)
                if not check_solution(cand, ctx.profile, ctx.slo, ctx.latency_quantile) and (
                        best is None or _rank(cand) > _rank(best)):
                    best = cand
            _reset(mi)
            if best is not None and best.served_qps >= lp_bound["served"] * (1 - 1e-3) - 1e-6 and \
                    best.served_qps * (best.expected_accuracy or 0) >= lp_bound["accmass"] * (1 - 2e-3) - 1e-6:
                break
        if best is not None:
            _reset(m)
            return replace(best, solve_ms=(ctx.clock() - t0) * 1000.0)
        m.set(r_ub=_round(m, ctx, r_star))
        status, info = _phases(m, ctx, swap_w, work)
        if not info:
            _reset(m)
            return _failed(ctx, m, "repair:" + status, t0)
    solution = _extract(ctx, m, status, lp_bound, t0, integral=integral)
    _reset(m)
    problems = check_solution(solution, ctx.profile, ctx.slo, ctx.latency_quantile)
    if problems:   # e.g. a time-limited incumbent that is not feasible: do not publish it
        return _failed(ctx, m, f"unsound: {problems[:3]}", t0)
    return solution


def _rank(s: PlanSolution) -> tuple:
    return (round(s.served_qps, 6), round(s.served_qps * (s.expected_accuracy or 0.0), 6), -s.workers_used)


def _reset(m: PlanningModel) -> None:
    """Drop the repair bounds so the cached model starts clean next time."""
    n = float(m.p["n_workers"].value)
    m.set(r_lb=np.zeros(len(m.buckets)), r_ub=np.full(len(m.buckets), n), y_ub=np.ones(len(m.nl)))


def _failed(ctx: PlannerContext, m: PlanningModel, status: str, t0: float,
            why: str = "solver failed") -> PlanSolution:
    return PlanSolution(ok=False, mode="failed", status=status, pipeline=ctx.profile.name, method=ctx.method,
                        demand_qps=ctx.demand_qps, served_qps=0.0, expected_accuracy=None,
                        max_accuracy=m.max_accuracy if m.configs else 0.0, workers_used=0,
                        n_workers=ctx.n_workers, solve_ms=(ctx.clock() - t0) * 1000.0,
                        message=f"{why}; keep the previous plan")


def _extract(ctx: PlannerContext, m: PlanningModel, status: str, lp_bound: dict, t0: float,
             integral: bool) -> PlanSolution:
    x = np.maximum(np.asarray(m.x.value, dtype=float), 0.0)
    x[x < 1e-9] = 0.0
    load = m.L @ x
    need = load / m.thr
    r = np.asarray(m.r.value, dtype=float)
    # integer replicas: the MILP's (rounded off tolerance) or the ceil of the repaired LP's,
    # which stays within the rounded bounds and therefore within the cluster size
    r_int = np.round(r) if integral else np.ceil(r - 1e-6)
    r_int = np.maximum(r_int, np.ceil(need - 1e-6))
    served = float(np.sum(x[[c.chain == 0 for c in m.configs]]))
    accmass = float(m.acc @ x)
    exp_acc = accmass / served if served > EPS else None
    allocs = tuple(Allocation(b.task, b.variant, b.batch, int(n)) for b, n in zip(m.buckets, r_int) if n >= 1)
    flows = tuple(PathFlow(m.chains[c.chain], c.variants, c.batches, float(x[k]), c.accuracy, c.mult)
                  for k, c in enumerate(m.configs) if x[k] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(load > 1e-9, r_int * m.thr / np.maximum(load, 1e-12), np.inf)
    capacity = served * float(np.min(head)) if served > EPS and np.isfinite(np.min(head)) else 0.0
    if served < ctx.demand_qps * (1 - 1e-6) - 1e-6:
        mode = "overload"
    elif exp_acc is None or exp_acc >= m.max_accuracy * (1 - 1e-6) - 1e-9:
        mode = "hardware"
    else:
        mode = "accuracy"
    return PlanSolution(ok=True, mode=mode, status=status, pipeline=ctx.profile.name, method=ctx.method,
                        demand_qps=float(ctx.demand_qps), served_qps=served, expected_accuracy=exp_acc,
                        max_accuracy=m.max_accuracy, workers_used=int(r_int.sum()), n_workers=ctx.n_workers,
                        allocations=allocs, flows=flows, capacity_qps=capacity, lp_bound=lp_bound,
                        solve_ms=(ctx.clock() - t0) * 1000.0,
                        variant_accuracy={a.variant: ctx.profile.task(a.task).variant(a.variant).accuracy
                                          for a in allocs})
