"""The controller's decide step: (live workers, estimated demand, previous plan) ->
plan, with the CVXPY planner of ``services.planner``. The controller and the
simulator both run :class:`PlannerPolicy`; the simulator only injects a caching solver.

Workers registered for a task (``RegisteredWorker.task``) run only that task's
variants, so each task's bound workers cap its replicas; workers with no task (a pool)
go wherever the plan needs them (``services.planner.assign``). Re-planning is
hysteretic, since a model swap costs seconds: a new solve happens when membership
changes, when demand rose by more than ``replan_threshold`` over the demand of the
current plan (at once: too little capacity costs SLO misses), when it fell by more than
twice that and the plan is at least ``cooldown_s`` old (too much capacity only costs
accuracy or workers), every ``max_plan_age_s``, or when the measured batch times have
moved the calibrated profile by more than its margin (``services.policy.calibration``).
The planner's own change cost keeps variants stable otherwise. Demands are solved on a
geometric grid (``demand_grid``: 2 % steps, rounded up), so a solve can be reused.

Plans settle (both off by default; the controller turns them on, ``--min-dwell-s`` and
``--peak-hold-s``): a plan stays at least ``min_dwell_s`` unless the workers changed or
the estimate rose beyond what the plan carries (``planned_capacity``), which re-plans at
once; and the demand planned for is never below the highest estimate of the last
``peak_hold_s`` (:meth:`held_demand`), so between the peaks of a periodic load the plan
does not drift back to accurate variants (or park workers) that the next peak overruns.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from services.common.logging import get_logger
from services.common.plan import ANY_PATH, Plan, RegisteredWorker, WorkerAssignment
from services.planner import PlannerContext, PlanSolution, load_profile, plan_from_solution, solve
from services.planner.capacity import max_demand
from services.planner.profile import PipelineProfile
from services.policy.calibration import LatencyCalibrator, Timing

log = get_logger(__name__)


def on_grid(demand_qps: float, grid: float | None, floor: float = 0.5) -> float:
    """``demand_qps`` rounded up to the next step of a geometric grid (no grid: as is)."""
    if grid is None:
        return demand_qps
    if demand_qps <= floor:
        return floor
    return grid ** math.ceil(math.log(demand_qps) / math.log(grid) - 1e-9)


Solver = Callable[[PlannerContext, "Plan | None"], PlanSolution]


def burst_variant(task, budget_ms: float) -> str:
    """A task's burst variant: the one with the most throughput at a batch size whose p95
    fits ``budget_ms`` (the planner's path budget), i.e. the cheapest capacity it has."""
    def best(v) -> float:
        fits = [b for b in v.latency_ms if v.latency(b) <= budget_ms]
        return max((v.throughput_qps(b) for b in fits), default=0.0)
    return max(task.variants, key=lambda v: (best(v), v.accuracy, v.name)).name


def with_burst_variants(plan: Plan, profile: PipelineProfile, slo_ms: float) -> Plan:
    """``plan`` naming every task's burst variant, with its batch latencies."""
    burst = {t.name: burst_variant(t, slo_ms / 2.0) for t in profile.tasks}
    latency = {t: dict(vs) for t, vs in plan.latency_ms.items()}
    for t, v in burst.items():
        prof = profile.task(t).variant(v)
        latency.setdefault(t, {})[v] = {b: p.p50_ms for b, p in sorted(prof.latency_ms.items())}
    return replace(plan, burst=burst, latency_ms=latency)


# The controller's defaults for plans that settle (its --min-dwell-s, --peak-hold-s,
# --calibration-dwell-s, --headroom-low); PlannerPolicy's own defaults leave them off, and
# the simulator's live model turns them on with :func:`settle`, as the controller runs.
CONTROLLER_SETTLING = dict(min_dwell_s=5.0, peak_hold_s=30.0, calibration_dwell_s=15.0, headroom_low=1.25)


def off_peak_headroom(headroom_low: float | None, burst: bool, hardware_only: bool) -> float | None:
    """The off-peak headroom a planner runs with: only with burst variants (they absorb a
    step while the plan is re-made) and never for hardware scaling only (full accuracy
    at every load: fewer workers off-peak would be its only lever, and its SLO the cost)."""
    return headroom_low if burst and not hardware_only else None


def settle(planner: "PlannerPolicy", hardware_only: bool = False) -> "PlannerPolicy":
    """``planner`` with the controller's settling defaults (``CONTROLLER_SETTLING``); the
    off-peak headroom only with burst variants and not for hardware scaling only, as the
    controller does; and standby models for parked workers (the controller's --standby)."""
    planner.standby = True
    planner.min_dwell_s = CONTROLLER_SETTLING["min_dwell_s"]
    planner.peak_hold_s = CONTROLLER_SETTLING["peak_hold_s"]
    planner.calibration_dwell_s = CONTROLLER_SETTLING["calibration_dwell_s"]
    planner.headroom_low = off_peak_headroom(CONTROLLER_SETTLING["headroom_low"], planner.burst, hardware_only)
    return planner


@dataclass
class PlannerPolicy:
    profile: PipelineProfile
    slo_ms: float
    method: str = "relaxed"
    # Plan for this multiple of the estimated demand. 2.0, not 1.25: demand jumps within a
    # second, faster than a re-plan and a model load; in the simulator (docs/results, the
    # headroom table) 1.25 / 2.0 / 3.0 give 9.5 / 1.1 / 0.05 % violations on the low-load
    # traffic-analysis trace, for 6.7 / 9.2 / 11.9 active workers off-peak.
    headroom: float = 2.0
    # Off-peak headroom: below a quarter of the cluster's full-accuracy capacity the plan is
    # for ``headroom_low`` x the estimate, rising linearly to ``headroom`` at half of it.
    # Off-peak, headroom costs workers; at peak it only costs accuracy. With burst variants
    # (``burst``) a step up is absorbed at once, so off-peak needs little. None: ``headroom``.
    headroom_low: float | None = None
    min_demand_qps: float = 0.5     # plan for at least this (a cold start is not zero load)
    replan_threshold: float = 0.15
    down_threshold: float = 0.30        # re-plan down when the target fell this far (after cooldown_s)
    cooldown_s: float = 15.0
    max_plan_age_s: float = 60.0
    node_limit: int = 5_000             # solver work per call: nodes, not seconds (reproducible)
    time_limit_s: float = 30.0          # wall-clock safety net only; counted when reached
    min_accuracy: float | None = None   # floor on expected accuracy (hardware scaling only)
    demand_grid: float | None = 1.02
    calibrate: bool = True              # correct the profile with measured batch times
    # name each task's burst variant in the plan (Plan.burst): workers keep it loaded beside
    # the planned one and spill a batch to it when their queue says the plan is overrun
    burst: bool = False
    # name, for each worker the plan parks, the model it would run in the plan for the
    # pool's full capacity (Plan.standby): it loads that model while parked, so the step
    # that brings it back costs no model load (live, a 1.2 s detector load on the cores
    # that serve the step lost 4-13 of the first step's 20 requests)
    standby: bool = False
    solver: Solver = solve
    # with a sharing table in the profile: most workers on one device (None: all on one);
    # services.planner.sharing.workers_per_device_from_env reads the deployment's setting
    workers_per_device: int | None = None
    verbose: bool = True                # log every solve (the simulator turns it off)
    # a plan stays this long (s) unless the workers changed or demand rose beyond its capacity
    min_dwell_s: float = 0.0
    # plan for at least the highest estimate of this many seconds (0: the estimate alone)
    peak_hold_s: float = 0.0
    # a re-plan for calibration drift alone waits until the plan is this old (and min_dwell_s),
    # unless a variant the plan runs measured slower than planned (its capacity is less than
    # the plan says): on a busy host the measured factors move by 30 % every few seconds, and
    # each re-plan that moves a model costs seconds of CPU (live: one every 5 s at the peak)
    calibration_dwell_s: float = 0.0
    planned_demand: float | None = field(default=None, init=False)
    planned_capacity: float | None = field(default=None, init=False)   # what the last plan serves (req/s)
    planned_members: tuple = field(default=(), init=False)
    planned_at: float = field(default=0.0, init=False)
    task_since: dict = field(default_factory=dict, init=False)   # worker -> (task, since) in the last plan
    calibrator: LatencyCalibrator = field(init=False)
    in_use: PipelineProfile | None = field(default=None, init=False)   # the profile last planned on
    full_capacity_qps: float | None = field(default=None, init=False)  # at full accuracy, last decide()
    _capacity_of: tuple = field(default=(None, 0, 0.0), init=False, repr=False)
    _peak_of: tuple = field(default=(None, None, None), init=False, repr=False)   # (profile, key, solution)
    _recent: deque = field(default_factory=deque, init=False, repr=False)   # (time, estimate)
    _spill_only: frozenset = field(default=frozenset(), init=False, repr=False)   # burst, not planned
    _runs: frozenset = field(default=frozenset(), init=False, repr=False)   # (task, variant) the plan runs

    def __post_init__(self) -> None:
        self.calibrator = LatencyCalibrator(self.profile)

    @staticmethod
    def from_file(path, slo_ms: float, **kw) -> "PlannerPolicy":
        return PlannerPolicy(load_profile(path), slo_ms, **kw)

    def prime(self, plan: Plan, workers: list[RegisteredWorker], now: float) -> None:
        """Take up ``plan``, made by a previous controller for these ``workers``, as if this
        policy had just made it (the caller seeds the calibrator with the plan's
        ``calibration`` when it adopts the plan, so measurements since then are kept): its
        planned demand (``planned_for_qps``; for older plans the root task's planned rate) and
        the workers become the ones the
        hysteresis of :meth:`should_replan` compares with. A restarted controller then
        re-plans for the reasons a running one would (demand, membership, drift, age),
        not merely because it restarted."""
        planned = plan.planned_for_qps or plan.planned_qps.get(self.profile.root.name, {}).get(ANY_PATH)
        self.planned_demand = planned if planned and planned > 0 else None
        self.planned_capacity = plan.capacity_qps or self.planned_demand
        self.planned_members = tuple(sorted((w.worker_id, w.task) for w in workers))
        self.planned_at = now

    def headroom_for(self, estimate_qps: float) -> float:
        c = self.full_capacity_qps
        if self.headroom_low is None or not c:
            return self.headroom
        x = min(1.0, max(0.0, (estimate_qps - c / 4.0) / (c / 4.0)))
        return self.headroom_low + x * (self.headroom - self.headroom_low)

    def target_demand(self, estimate_qps: float) -> float:
        return max(self.min_demand_qps, self.headroom_for(estimate_qps) * estimate_qps)

    def _full_capacity(self, profile: PipelineProfile, n_workers: int, caps) -> float | None:
        """The most demand ``n_workers`` carry at full accuracy (cached per profile object
        and cluster size; two solves of the planner)."""
        key = (n_workers, tuple(sorted(caps.items())) if caps else None)
        held, k, cap = self._capacity_of
        if held is profile and k == key:
            return cap
        top = max_demand(profile, n_workers, slo_ms=self.slo_ms, full_accuracy=True, method=self.method,
                         task_workers=caps, solver=self.solver, workers_per_device=self.workers_per_device)
        cap = top.served_qps if top.ok else None
        self._capacity_of = (profile, key, cap)
        return cap

    def standby_for(self, plan: Plan, workers: list[RegisteredWorker], profile: PipelineProfile,
                    caps) -> dict[str, str]:
        """``Plan.standby`` for ``plan``: each parked worker's task/variant in the plan this
        policy would make if demand rose to the pool's full-accuracy capacity (the least
        demand that needs every worker; with its headroom, the plan of a step to it), or,
        where that capacity is unknown, in the plan for the most demand the pool serves.
        It is bound with ``plan`` as the previous plan, as the step's plan will be, so the
        workers ``plan`` runs keep their tasks and the parked ones take the rest. One solve
        per profile and worker set."""
        parked = [w for w in workers if w.worker_id not in plan.workers]
        if not parked:
            return {}
        key = (tuple(sorted((w.worker_id, w.task) for w in workers)), tuple(sorted(caps.items())) if caps else None)
        held, k, step = self._peak_of
        if held is not profile or k != key:
            cap = self._full_capacity(profile, len(workers), caps)
            if cap:
                demand = on_grid(self.target_demand(cap), self.demand_grid, self.min_demand_qps)
                step = self.solver(PlannerContext(profile, demand_qps=demand, n_workers=len(workers),
                                                  slo_ms=self.slo_ms, method=self.method,
                                                  node_limit=self.node_limit, time_limit_s=self.time_limit_s,
                                                  min_accuracy=self.min_accuracy, task_workers=caps,
                                                  workers_per_device=self.workers_per_device), plan)
            else:
                step = max_demand(profile, len(workers), slo_ms=self.slo_ms, method=self.method,
                                  node_limit=self.node_limit, task_workers=caps, solver=self.solver,
                                  workers_per_device=self.workers_per_device)
            self._peak_of = (profile, key, step)
        if not step.ok:
            return {}
        full = plan_from_solution(step, workers, plan, version=0, profile=profile,
                                  since={w: t for w, (_, t) in self.task_since.items()})
        if full is None:
            return {}
        return {w.worker_id: f"{a.task}/{a.variant}" for w in parked
                if (a := full.workers.get(w.worker_id)) is not None}

    @staticmethod
    def with_standby(previous: Plan | None, workers: list[RegisteredWorker]) -> Plan | None:
        """``previous`` with each parked worker's standby model counted as a model it runs:
        the solver's change cost then treats adding a replica of it as free (it is loaded),
        and binding gives a parked worker the allocation of its standby variant when the
        new plan has one (so the step that brings it back finds its model warm)."""
        if previous is None or not previous.standby:
            return previous
        address = {w.worker_id: w.address for w in workers}
        extra = {}
        for wid, tv in previous.standby.items():
            if wid in address and wid not in previous.workers:
                task, _, variant = tv.partition("/")
                extra[wid] = WorkerAssignment(wid, address[wid], task, variant, 1)
        return replace(previous, workers={**previous.workers, **extra}) if extra else previous

    def observe_timings(self, timings: Iterable[Timing]) -> None:
        """Batch times the workers measured (their heartbeats; the simulator's batches).
        Batches of a burst variant that no worker runs as its planned variant are left out:
        a spilled batch is timed from before its items' re-preparation and its wait behind
        the planned batches in the worker's inference thread, so on a busy worker it reads
        many times the variant's batch time (11-15x measured live for det_v6tiny_320), and
        the planner would then take its cheapest capacity for its slowest."""
        if self.calibrate:
            self.calibrator.observe([t for t in timings if (t.task, t.variant) not in self._spill_only])

    def held_demand(self, estimate_qps: float, now: float) -> float:
        """The demand to plan for: the estimate, or the highest estimate of the last
        ``peak_hold_s`` seconds (a peak that passed may come back)."""
        if self.peak_hold_s <= 0:
            return estimate_qps
        recent = self._recent
        if not recent or now > recent[-1][0]:
            recent.append((now, estimate_qps))
        elif now == recent[-1][0]:     # should_replan and decide in one tick: one entry
            recent[-1] = (now, max(recent[-1][1], estimate_qps))
        while recent and recent[0][0] < now - self.peak_hold_s:
            recent.popleft()
        return max([estimate_qps] + [e for _, e in recent])

    def should_replan(self, workers: list[RegisteredWorker], estimate_qps: float, now: float) -> bool:
        members = tuple(sorted((w.worker_id, w.task) for w in workers))
        held = self.held_demand(estimate_qps, now)
        if self.planned_demand is None or members != self.planned_members:
            return True
        planned = max(self.planned_demand, 1e-9)
        target = self.target_demand(held)
        rising = target > planned * (1 + self.replan_threshold)
        if rising and estimate_qps > (self.planned_capacity or planned):
            return True                     # beyond what the plan carries: at once
        if now - self.planned_at < self.min_dwell_s:
            return False
        if now - self.planned_at > self.max_plan_age_s:
            return True
        if self.calibrate and self.calibrator.needs_replan() and \
                (now - self.planned_at >= self.calibration_dwell_s or self._runs_slower()):
            return True
        if rising:
            return True
        return target < planned * (1 - self.down_threshold) and now - self.planned_at >= self.cooldown_s

    def _runs_slower(self) -> bool:
        """A variant the plan runs measured slower than the profile the plan was made on,
        by more than the calibrator's margin: the plan carries less than it says."""
        cal = self.calibrator
        factors = cal.factors()
        return any(factors.get(k, 1.0) > cal.in_use.get(k, 1.0) * (1 + cal.margin) for k in self._runs)

    def current_profile(self) -> PipelineProfile:
        """The profile to plan on: the calibrated one, re-scaled when the measurements
        moved past the calibrator's margin."""
        if not self.calibrate:
            return self.profile
        if self.in_use is None or self.calibrator.needs_replan():
            drift = self.calibrator.drift()
            self.in_use = self.calibrator.calibrated()
            if self.verbose and self.calibrator.host_factor() is not None:
                log.info("profile_calibrated", drift=round(drift, 3), host_factor=round(self.calibrator.host_factor(), 3),
                         factors={f"{t}/{v}": round(f, 3) for (t, v), f in sorted(self.calibrator.in_use.items())})
        return self.in_use

    def decide(self, workers: list[RegisteredWorker], estimate_qps: float, previous: Plan | None,
               now: float | None = None, version: int = 0) -> Plan | None:
        """Solve for the current workers and demand. Returns plan ``version`` (0: the
        publisher stamps it) or None when the solver failed (keep the previous plan)."""
        now = time.monotonic() if now is None else now
        bound = Counter(w.task for w in workers if w.task)
        pool = sum(1 for w in workers if not w.task)
        profile = self.current_profile()
        caps = {t.name: bound[t.name] + pool for t in profile.tasks} if bound else None
        if self.headroom_low is not None:
            self.full_capacity_qps = self._full_capacity(profile, len(workers), caps)
        target = self.target_demand(self.held_demand(estimate_qps, now))
        ctx = PlannerContext(profile, demand_qps=on_grid(target, self.demand_grid, self.min_demand_qps),
                             n_workers=len(workers), slo_ms=self.slo_ms, method=self.method,
                             node_limit=self.node_limit, time_limit_s=self.time_limit_s, min_accuracy=self.min_accuracy,
                             task_workers=caps, workers_per_device=self.workers_per_device)
        warm = self.with_standby(previous, workers)
        solution = self.solver(ctx, warm)
        if self.calibrate and solution.ok and solution.sharing_k:
            # the load the plan's batch times will be measured under: the calibrator divides
            # its sharing factor out, so the planner's own factor is not applied twice
            self.calibrator.set_busy(solution.sharing_k)
        self.planned_members = tuple(sorted((w.worker_id, w.task) for w in workers))
        self.planned_at = now
        if solution.time_limit_hits:
            log.warning("planner_time_limit_hit", calls=solution.time_limit_hits, time_limit_s=self.time_limit_s,
                        why="the solver reached its wall-clock safety net, so this plan depends on the machine's speed")
        if not solution.ok:
            log.error("planner_failed", status=solution.status, message=solution.message,
                      demand_qps=round(target, 2))
            self.planned_demand = None
            return None
        self.planned_demand = target
        self.planned_capacity = solution.capacity_qps if solution.capacity_qps > 0 else target
        # version 0: the controller's publisher stamps version and creation time (its clock
        # here is monotonic, not a Unix time); a caller that versions plans itself (the
        # simulator) gets its own clock's time as the creation time
        plan = plan_from_solution(solution, workers, warm, version=version, now=now if version else None,
                                  profile=profile, since={w: t for w, (_, t) in self.task_since.items()})
        # when each worker took the task it has now: a move between pool workers takes one
        # that took its task a moment ago (maybe still loading) before one long serving it
        self.task_since = {w: (a.task, self.task_since[w][1]) if w in self.task_since
                           and self.task_since[w][0] == a.task else (a.task, now)
                           for w, a in plan.workers.items()}
        plan = replace(plan, planned_for_qps=target)
        if self.burst and self.min_accuracy is None:   # a burst variant would break the floor
            plan = with_burst_variants(plan, profile, self.slo_ms)
        if self.standby:
            plan = replace(plan, standby=self.standby_for(plan, workers, profile, caps))
        runs = {(w.task, w.variant) for w in plan.workers.values()}
        self._runs = frozenset(runs)
        self._spill_only = frozenset((t, v) for t, v in plan.burst.items() if (t, v) not in runs)
        if self.calibrate and self.calibrator.host_factor() is not None:
            plan = replace(plan, calibration={f"{t}/{v}": round(f, 4)
                                              for (t, v), f in sorted(self.calibrator.in_use.items())})
        if self.verbose:
            log.info("planner_solved", mode=solution.mode, demand_qps=round(target, 2),
                     served_qps=round(solution.served_qps, 2),
                     expected_accuracy=None if solution.expected_accuracy is None
                     else round(solution.expected_accuracy, 4),
                     workers_used=solution.workers_used, solve_ms=round(solution.solve_ms, 1),
                     solver_nodes=solution.solver_nodes, solver_iterations=solution.solver_iterations,
                     allocations=[f"{a.task}:{a.variant}@{a.batch_size}x{a.replicas}"
                                  for a in solution.allocations])
        return plan
