"""Allocation policies for the simulator: ours and the baselines, one class each.

A policy sees what a controller sees (an :class:`Observation`: time, the estimated
root demand, per-task observed query rates, the current plan) and returns a
:class:`Decision` (a real :class:`services.common.plan.Plan` plus the planned query
rate per (task, upstream path), which MostAccurateFirst uses as capacities) or None to
keep the current plan. The simulator is a pool of ``n_workers`` interchangeable
workers; `services.planner.assign.bind_pool` decides which worker serves which task (keeping workers
where they are), and ``services.common.plan.assign_workers`` which variant it runs.

What each policy models (docs/simulator.md has the longer story):

* ``ours``: the controller's planner mode: demand estimate x headroom, re-plan when it
  moves by more than 15 % (``services.policy.planning.PlannerPolicy``), joint
  pipeline planner (relaxed LP + repair), admission at the planned served rate in
  overload, MostAccurateFirst routing, early dropping, opportunistic rerouting.
  Ablations: ``ours-exact`` (exact MILP), ``ours-no-drop``, ``ours-no-reroute``.
* ``inferline``: InferLine-like pipeline-aware *hardware* scaling only: the same
  planner with the accuracy floor at the best achievable (most accurate variants), no
  admission control (InferLine has none); same data plane.
* ``proteus``: Proteus-like accuracy scaling *per task*: each task is planned alone on
  its own observed query rate (which lags the upstream variant choice), with a latency
  budget of SLO / depth and a share of the cluster proportional to its full-accuracy
  need; no path awareness, no admission control.
* ``infaas``: INFaaS-like per-task greedy: one variant per task; when a task runs hot
  (utilisation > 0.9) add a free worker, else downgrade one accuracy step; when cold
  (< 0.5) upgrade if the better variant would run below 0.8, else release a worker.
* ``clipper-high`` / ``clipper-low``: Clipper-like static provisioning of all workers
  with the most (least) accurate variant of every task, planned once for the whole
  cluster; never re-planned, no admission control.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Mapping

from services.common.plan import ANY_PATH, Allocation, Plan, RegisteredWorker, assign_workers
from services.planner import PlannerContext, solve
from services.planner.assign import bind_pool, bucket_rates, latency_table
from services.planner.profile import PipelineProfile, TaskProfile
from services.planner.solver import PlanSolution
from services.policy.calibration import scale_profile
from services.policy.planning import PlannerPolicy, on_grid

GRID = PlannerPolicy.demand_grid   # plans are solved for demands on this geometric grid (cacheable)


@dataclass(frozen=True)
class Observation:
    now: float
    root_qps: float                       # the controller's demand estimate
    task_qps: Mapping[str, float]         # observed query arrival rate per task (EWMA)
    current: Plan | None
    n_workers: int


@dataclass(frozen=True)
class Decision:
    plan: Plan
    planned_qps: Mapping[tuple[str, str], float] = field(default_factory=dict)   # (task, path) -> q/s
    admission_qps: float | None = None
    expected_accuracy: float | None = None


def worker_ids(n: int) -> list[str]:
    return [f"w{i:04d}" for i in range(n)]


_SOLVES: dict[tuple, PlanSolution] = {}


def _solve_key(ctx: PlannerContext, previous: Plan | None) -> tuple:
    # the solver reads only the variant counts of the previous plan (its change cost)
    prev = tuple(sorted(Counter((a.task, a.variant) for a in previous.workers.values()).items())) \
        if previous is not None else None
    caps = tuple(sorted(ctx.task_workers.items())) if ctx.task_workers else None
    return (profile_key(ctx.profile), round(ctx.demand_qps, 6), ctx.n_workers, ctx.method,
            ctx.min_accuracy, ctx.slo_ms, caps, ctx.accuracy_tolerance, prev, ctx.workers_per_device)


_PROFILE_KEYS: dict[int, tuple[PipelineProfile, str]] = {}


def profile_key(profile: PipelineProfile) -> str:
    """The profile's content as a cache key, computed once per profile object (two
    policies planning on equal profiles share their solves)."""
    held = _PROFILE_KEYS.get(id(profile))
    if held is None or held[0] is not profile:
        held = _PROFILE_KEYS[id(profile)] = (profile, profile.key())
    return held[1]


def caching_solver(ctx: PlannerContext, previous: Plan | None = None) -> PlanSolution:
    """``services.planner.solve``, cached (for speed: a run re-plans thousands of times for
    a few dozen distinct demands), keyed by everything the solver reads."""
    key = _solve_key(ctx, previous)
    hit = _SOLVES.get(key)
    if hit is None:
        hit = _SOLVES[key] = solve(ctx, previous)
    return hit


def cached_solve(profile: PipelineProfile, demand: float, n_workers: int, method: str = "relaxed",
                 min_accuracy: float | None = None, slo_ms: float | None = None,
                 previous: Plan | None = None) -> PlanSolution:
    """:func:`caching_solver` for the baselines, which plan without the controller's policy."""
    return caching_solver(PlannerContext(profile, demand_qps=demand, n_workers=n_workers, method=method,
                                         min_accuracy=min_accuracy, slo_ms=slo_ms), previous)


def round_up(q: float) -> float:
    return on_grid(q, GRID)


def pool(n: int) -> list[RegisteredWorker]:
    """The simulator's workers: a pool with no task, bound by each plan."""
    return [RegisteredWorker(w, f"sim:{w}", "") for w in worker_ids(n)]


def bound_workers(counts: Mapping[str, int], n: int) -> list[RegisteredWorker]:
    """``n`` workers registered for tasks: the first ``counts[t0]`` for t0, and so on."""
    if sum(counts.values()) != n:
        raise ValueError(f"task-bound worker counts {dict(counts)} must add up to {n}")
    tasks = [t for t, k in counts.items() for _ in range(k)]
    return [RegisteredWorker(w, f"sim:{w}", t) for w, t in zip(worker_ids(n), tasks)]


def planned_rates(plan: Plan) -> dict[tuple[str, str], float]:
    """The plan's planned query rate per (task, upstream path), as MostAccurateFirst reads it."""
    return {(t, p): q for t, paths in plan.planned_qps.items() for p, q in paths.items()}


class Policy:
    name = "policy"
    early_drop = True
    reroute = True
    cancel_failed = False    # discard queued sub-queries of requests that already failed

    def __init__(self, profile: PipelineProfile, n_workers: int) -> None:
        self.profile = profile
        self.n_workers = n_workers
        self.version = 0
        self.task_order = [t.name for t in profile.tasks]

    def decide(self, obs: Observation) -> Decision | None:   # pragma: no cover - interface
        raise NotImplementedError

    def _plan_from_allocs(self, allocs: list[Allocation], rates: Mapping[tuple[str, str], float],
                          current: Plan | None, now: float, source: str) -> Decision:
        """A plan for per-task policies: ANY_PATH routing by planned bucket rates
        ``rates[(task, variant, batch)]``, split evenly over the bucket's workers."""
        regs = bind_pool(allocs, pool(self.n_workers), current, self.task_order)
        assigned = assign_workers(allocs, regs, current)
        members: dict[tuple, list[str]] = defaultdict(list)
        for a in sorted(assigned.values(), key=lambda a: a.worker_id):
            members[(a.task, a.variant, a.batch_size)].append(a.worker_id)
        routing: dict[str, dict[str, dict[str, float]]] = {}
        planned: dict[tuple[str, str], float] = {}
        for task in self.task_order:
            w: dict[str, float] = {}
            for key, ids in members.items():
                if key[0] != task:
                    continue
                q = max(rates.get(key, 0.0), 1e-9)
                for wid in ids:
                    w[wid] = w.get(wid, 0.0) + q / len(ids)
            tot = sum(w.values())
            if tot > 0:
                routing[task] = {ANY_PATH: {k: x / tot for k, x in sorted(w.items())}}
                planned[(task, ANY_PATH)] = sum(rates.get(k, 0.0) for k in members if k[0] == task)
        self.version += 1
        plan = Plan(self.version, self.profile.name, dict(sorted(assigned.items())), routing,
                    source=source, created_unix_s=now, latency_ms=latency_table(self.profile, assigned.values()))
        return Decision(plan, planned)


class OursPolicy(Policy):
    """The controller's planner mode (see the module docstring): the controller's own
    :class:`PlannerPolicy`, with a caching solver and the simulator's pool of workers."""

    name = "ours"

    def __init__(self, profile: PipelineProfile, n_workers: int, method: str = "relaxed",
                 early_drop: bool = True, reroute: bool = True, admission: bool = True,
                 full_accuracy_only: bool = False, name: str | None = None,
                 batch_budget: float = 0.5, headroom: float | None = None, cancel_failed: bool = False,
                 calibrate: bool = True, spill: bool = True, min_accuracy: float | None = None,
                 task_bound: Mapping[str, int] | None = None) -> None:
        super().__init__(profile, n_workers)
        self.spill = spill
        self.cancel_failed = cancel_failed
        # the planner keeps the sum of batch latencies on a path within slo_ms / 2; planning
        # for slo_ms = 2 * batch_budget * SLO leaves (1 - batch_budget) * SLO for queueing
        self.plan_slo_ms = 2 * batch_budget * profile.slo_ms
        self.method = method
        self.early_drop = early_drop
        self.reroute = reroute
        self.admission = admission
        self.name = name or self.name
        if full_accuracy_only:
            best = cached_solve(profile, 1.0, n_workers, method, slo_ms=self.plan_slo_ms).max_accuracy
            min_accuracy = best * (1 - 1e-6)
        # the controller's own default headroom unless told otherwise
        kw = {} if headroom is None else {"headroom": headroom}
        self.planner = PlannerPolicy(profile, self.plan_slo_ms, method=method, min_accuracy=min_accuracy,
                                     solver=caching_solver, calibrate=calibrate, verbose=False, burst=spill, **kw)
        # a pool (workers go where the plan needs them) or, with ``task_bound``, workers
        # registered for a task each (task -> count), as a cluster of task-bound workers runs
        self.members = pool(n_workers) if not task_bound else bound_workers(task_bound, n_workers)

    def observe_timings(self, timings) -> None:
        self.planner.observe_timings(timings)

    def decide(self, obs: Observation) -> Decision | None:
        if obs.current is not None and not self.planner.should_replan(self.members, obs.root_qps, obs.now):
            return None
        plan = self.planner.decide(self.members, obs.root_qps, obs.current, obs.now, version=self.version + 1)
        if plan is None:
            return None
        self.version += 1
        return Decision(plan, planned_rates(plan), plan.admission_rate_qps if self.admission else None,
                        plan.expected_accuracy)


def single_task_profile(profile: PipelineProfile, task: str, slo_ms: float,
                        variants: list[str] | None = None) -> PipelineProfile:
    t = profile.task(task)
    vs = tuple(v for v in t.variants if variants is None or v.name in variants)
    return PipelineProfile(name=f"{profile.name}.{task}", slo_ms=slo_ms, tasks=(TaskProfile(task, vs),),
                           device=profile.device, source=profile.source)


def restricted_profile(profile: PipelineProfile, pick) -> PipelineProfile:
    """The profile with one variant per task, ``pick(task) -> variant``."""
    tasks = []
    for t in profile.tasks:
        v = pick(t)
        fan = {v.name: dict(t.fan_out[v.name])} if t.children else {}
        tasks.append(TaskProfile(t.name, (v,), t.children, fan))
    return replace(profile, name=profile.name, tasks=tuple(tasks))


def depth(profile: PipelineProfile) -> int:
    return max(len(c) for c in profile.chains())


def best_batch(v, budget_ms: float) -> int:
    """The batch size with the most throughput whose p95 latency fits ``budget_ms``."""
    fits = [b for b in v.latency_ms if v.latency(b) <= budget_ms] or [min(v.latency_ms)]
    return max(fits, key=lambda b: (v.throughput_qps(b), -b))


class ProteusPolicy(Policy):
    """Per-task accuracy scaling on per-task observed demand (module docstring)."""

    name = "proteus"
    admission = False

    def __init__(self, profile: PipelineProfile, n_workers: int, headroom: float = PlannerPolicy.headroom,
                 threshold: float = 0.15, max_age_s: float = 60.0) -> None:
        super().__init__(profile, n_workers)
        self.headroom, self.threshold, self.max_age_s = headroom, threshold, max_age_s
        self.budget = profile.slo_ms / depth(profile)
        self.subs = {t.name: single_task_profile(profile, t.name, self.budget) for t in profile.tasks}
        self.planned: dict[str, float] | None = None
        self.at = 0.0

    def decide(self, obs: Observation) -> Decision | None:
        targets = {t: max(0.5, self.headroom * obs.task_qps.get(t, 0.0)) for t in self.task_order}
        if self.planned is not None and obs.now - self.at < self.max_age_s and all(
                abs(targets[t] - self.planned[t]) <= self.threshold * max(self.planned[t], 1e-9)
                for t in self.task_order):
            return None
        self.planned, self.at = targets, obs.now
        need = {}
        for t in self.profile.tasks:
            top = max(t.variants, key=lambda v: v.accuracy)
            need[t.name] = targets[t.name] / top.throughput_qps(best_batch(top, self.budget / 2))
        caps = split_workers(need, self.n_workers)
        allocs: list[Allocation] = []
        rates: dict[tuple, float] = {}
        for t in self.task_order:
            sol = cached_solve(self.subs[t], round_up(targets[t]), caps[t])
            if not sol.ok:   # no variant fits the task's share of the SLO: give it the whole SLO
                sol = cached_solve(single_task_profile(self.profile, t, self.profile.slo_ms),
                                   round_up(targets[t]), caps[t])
            if not sol.ok:
                return None
            allocs.extend(sol.allocations)
            for f in sol.flows:
                key = (t, f.variants[0], f.batches[0])
                rates[key] = rates.get(key, 0.0) + f.rate_qps
        return self._plan_from_allocs(allocs, rates, obs.current, obs.now, "proteus")


def split_workers(need: Mapping[str, float], n: int) -> dict[str, int]:
    """Largest-remainder split of ``n`` workers proportional to ``need``, at least 1 each."""
    tasks = list(need)
    tot = sum(need.values()) or 1.0
    raw = {t: max(1.0, n * need[t] / tot) for t in tasks}
    base = {t: int(math.floor(raw[t])) for t in tasks}
    left = n - sum(base.values())
    for t in sorted(tasks, key=lambda t: -(raw[t] - base[t])):
        if left <= 0:
            break
        base[t] += 1
        left -= 1
    while sum(base.values()) > n:   # the minimum of 1 each overshot: take from the largest
        t = max(base, key=base.get)
        base[t] -= 1
    return base


class InfaasPolicy(Policy):
    """Per-task greedy upgrade/downgrade (module docstring)."""

    name = "infaas"
    admission = False

    def __init__(self, profile: PipelineProfile, n_workers: int, hot: float = 0.9, cold: float = 0.5,
                 upgrade_below: float = 0.8) -> None:
        super().__init__(profile, n_workers)
        self.hot, self.cold, self.upgrade_below = hot, cold, upgrade_below
        budget = profile.slo_ms / depth(profile) / 2
        # only variants whose single-query latency fits the task's budget (else the fastest)
        self.ladder = {}
        for t in profile.tasks:
            fit = [v for v in t.variants if v.latency(1) <= budget] or [min(t.variants, key=lambda v: v.latency(1))]
            self.ladder[t.name] = [(v, best_batch(v, budget)) for v in sorted(fit, key=lambda v: -v.accuracy)]
        self.state: dict[str, list[int]] | None = None    # task -> [variant index, replicas]

    def _thr(self, t: str, i: int) -> float:
        v, b = self.ladder[t][i]
        return v.throughput_qps(b)

    def decide(self, obs: Observation) -> Decision | None:
        lam = {t: obs.task_qps.get(t, 0.0) for t in self.task_order}
        if self.state is None:
            need = {t: lam[t] / self._thr(t, 0) for t in self.task_order}
            reps = {t: max(1, math.ceil(need[t] / self.upgrade_below)) for t in self.task_order}
            if sum(reps.values()) > self.n_workers:
                reps = split_workers(need, self.n_workers)
            self.state = {t: [0, reps[t]] for t in self.task_order}
        else:
            changed = False
            for t in self.task_order:
                i, r = self.state[t]
                util = lam[t] / (r * self._thr(t, i))
                free = self.n_workers - sum(s[1] for s in self.state.values())
                if util > self.hot:
                    if free > 0:
                        self.state[t][1] += 1
                        changed = True
                    elif i + 1 < len(self.ladder[t]):
                        self.state[t][0] += 1
                        changed = True
                elif util < self.cold:
                    if i > 0 and lam[t] / (r * self._thr(t, i - 1)) < self.upgrade_below:
                        self.state[t][0] -= 1
                        changed = True
                    elif r > 1 and lam[t] / ((r - 1) * self._thr(t, i)) < self.upgrade_below:
                        self.state[t][1] -= 1
                        changed = True
            if not changed:
                return None
        allocs, rates = [], {}
        for t in self.task_order:
            i, r = self.state[t]
            v, b = self.ladder[t][i]
            allocs.append(Allocation(t, v.name, b, r))
            rates[(t, v.name, b)] = lam[t]
        return self._plan_from_allocs(allocs, rates, obs.current, obs.now, "infaas")


class ClipperPolicy(Policy):
    """Static provisioning of every worker with one variant per task (module docstring)."""

    admission = False

    def __init__(self, profile: PipelineProfile, n_workers: int, highest: bool = True) -> None:
        super().__init__(profile, n_workers)
        self.name = "clipper-high" if highest else "clipper-low"
        key = (lambda v: v.accuracy) if highest else (lambda v: -v.accuracy)
        budget = profile.slo_ms / 2 / depth(profile)

        def pick(t):   # the most (least) accurate variant whose single query fits its share of SLO/2
            fit = [v for v in t.variants if v.latency(1) <= budget] or [min(t.variants, key=lambda v: v.latency(1))]
            return max(fit, key=key)
        self.fixed = restricted_profile(profile, pick)
        self.done = False

    def decide(self, obs: Observation) -> Decision | None:
        if self.done:
            return None
        self.done = True
        sol = cached_solve(self.fixed, 1e6, self.n_workers)   # overload: most it can serve
        reps = {(a.task, a.variant, a.batch_size): a.replicas for a in sol.allocations}
        rates = {(b[0], b[1], b[2]): 0.0 for b in reps}
        for t, paths in bucket_rates(sol).items():
            for p, bk in paths.items():
                for (v, b), q in bk.items():
                    rates[(t, v, b)] = rates.get((t, v, b), 0.0) + q
        # every worker stays active: spare workers join the most utilised bucket
        while sum(reps.values()) < self.n_workers:
            k = max(reps, key=lambda k: rates.get(k, 0.0) / reps[k])
            reps[k] += 1
        allocs = [Allocation(t, v, b, r) for (t, v, b), r in sorted(reps.items())]
        return self._plan_from_allocs(allocs, rates, obs.current, obs.now, self.name)


POLICIES = ("ours", "ours-exact", "ours-no-drop", "ours-no-reroute", "ours-no-spill", "inferline", "proteus", "infaas",
            "clipper-high", "clipper-low")


def make_policy(name: str, profile: PipelineProfile, n_workers: int, profile_error: float = 1.0) -> Policy:
    """The policy ``name`` planning on ``profile`` with every latency multiplied by
    ``profile_error`` (0.5: a profile 2x too optimistic; the simulator executes the true
    profile, so only policies that calibrate from measured batch times recover)."""
    if profile_error != 1.0:
        profile = scale_profile(profile, {(t.name, v.name): profile_error for t in profile.tasks
                                          for v in t.variants}, note=f"x{profile_error:g} (profile error)")
    if name == "ours":
        return OursPolicy(profile, n_workers)
    if name == "ours-exact":
        return OursPolicy(profile, n_workers, method="exact", name=name)
    if name == "ours-no-drop":
        return OursPolicy(profile, n_workers, early_drop=False, name=name)
    if name == "ours-no-reroute":
        return OursPolicy(profile, n_workers, reroute=False, name=name)
    if name == "ours-no-spill":
        return OursPolicy(profile, n_workers, spill=False, name=name)
    if name == "inferline":
        return OursPolicy(profile, n_workers, admission=False, full_accuracy_only=True, spill=False, name=name)
    if name == "proteus":
        return ProteusPolicy(profile, n_workers)
    if name == "infaas":
        return InfaasPolicy(profile, n_workers)
    if name in ("clipper-high", "clipper-low"):
        return ClipperPolicy(profile, n_workers, highest=name == "clipper-high")
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
