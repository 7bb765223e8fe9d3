"""The controller's reconcile loop: workers -> desired allocation -> versioned plan.

Two sources of the allocation: an operator plan file (or ``SetPlan``), or the planner
(``PlannerPolicy``: the CVXPY planner on the estimated demand). Each step runs its
sub-updates (expire lost workers, reload the operator plan file, plan, publish) each in
its own try/except that logs and continues: the loop never dies, and a failed step
keeps the last published plan.

Control steps are serialised: the loop's step and an operator's ``SetPlan`` never run
at once (a planner solve still running when an operator plan arrives would otherwise
publish over it). A controller that starts while Redis holds a plan *adopts* it: it
becomes the current plan (the planner's previous plan, so its change cost keeps the
workers where they are), and no new plan is made until the workers it names have
registered again or ``adopt_grace_s`` passed, so a restart causes no data-plane change.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Awaitable, Callable

from services.common.errors import SpecError
from services.common.logging import get_logger
from services.common.metrics import ControllerMetrics
from services.common.plan import (Allocation, Plan, assign_workers, bind_pool, load_plan_file, parse_plan_file,
                                  uniform_routing, validate_plan)
from services.common.spec import PipelineSpec
from services.controller.registry import WorkerRegistry
from services.policy.calibration import Timing
from services.policy.planning import PlannerPolicy

log = get_logger(__name__)

# fields that differ between two publications of the same plan
_NOT_COMPARED = frozenset({"version", "created_unix_s"})


@dataclass
class ReconcileResult:
    published: Plan | None
    lost: list[str]
    duration_ms: float


class ControllerCore:
    def __init__(self, spec: PipelineSpec, registry: WorkerRegistry,
                 publish: Callable[[Plan], Awaitable[Plan]], plan_file: Path | None = None,
                 planner: PlannerPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.registry = registry
        self._publish = publish
        self.plan_file = plan_file
        self.planner = planner
        self.clock = clock
        self.demand_qps = 0.0          # fed by the demand estimator (planner mode)
        self.demand_ready = True       # False until the estimator has seen a rate
        self._plan_file_mtime: float | None = None
        self.allocations: list[Allocation] | None = None
        self.current: Plan | None = None
        self.dirty = True
        self._missing_logged: list[str] = []
        self._lock = asyncio.Lock()
        self.adopted: Plan | None = None
        self.adopt_until = 0.0
        self.metrics = ControllerMetrics(spec.name)

    def adopt(self, plan: Plan, grace_s: float) -> None:
        """Take up ``plan`` (read from Redis at start) as the current plan; hold re-planning
        until its workers registered again or ``grace_s`` passed."""
        self.current = plan
        self.adopted = plan
        self.adopt_until = self.clock() + grace_s
        if self.planner is not None and plan.calibration:
            # plan on the host speed the previous controller measured, not the raw profile
            # (else its first plan after the grace could swap variants for no reason)
            self.planner.calibrator.seed(plan.calibration)
            self.planner.in_use = None
        log.info("plan_adopted", plan_version=plan.version, workers=len(plan.workers), source=plan.source,
                 grace_s=grace_s)

    def _waiting_for_adopted_workers(self) -> bool:
        if self.adopted is None:
            return False
        registered = {w.worker_id for w in self.registry.live()}
        missing = sorted(set(self.adopted.workers) - registered)
        if (missing or not self.demand_ready) and self.clock() < self.adopt_until:
            return True
        if missing:
            log.warning("adopted_workers_missing", workers=missing)
        elif self.planner is not None:
            # every worker is back: the adopted plan is the planner's own from here on, and
            # the next solve waits for a reason a running controller would have (their
            # re-registrations alone are none)
            self.planner.prime(self.adopted, self.registry.live(), self.clock())
            self.dirty = False
            log.info("adoption_complete", plan_version=self.adopted.version)
        self.adopted = None
        return False

    def observe_stats(self, task: str, stats: dict) -> None:
        """A worker's heartbeat: its batch timings go to the planner's calibration."""
        if self.planner is None:
            return
        timings = [Timing(t.get("task") or task, t["variant"], int(t["batch_size"]), int(t["count"]),
                          float(t["total_ms"]),
                          int(t.get("items", 0)), int(t.get("regions", 0)), float(t.get("max_ms", 0.0)))
                   for t in stats.get("timings", ())]
        if timings:
            self.planner.observe_timings(timings)

    def status(self) -> dict:
        """A summary of the cluster for the periodic status log line."""
        states = Counter(r.stats.get("state", "registering") for r in self.registry.records.values())
        return {
            "plan_version": self.current.version if self.current else None,
            "workers": len(self.registry.records),
            "states": dict(states),
            "queued": sum(int(r.stats.get("queue_length", 0)) for r in self.registry.records.values()),
            "dropped": sum(int(r.stats.get("dropped", 0)) for r in self.registry.records.values()),
            "shed": sum(int(r.stats.get("shed", 0)) for r in self.registry.records.values()),
            "errors": sum(int(r.stats.get("errors", 0)) for r in self.registry.records.values()),
            "demand_qps": round(self.demand_qps, 2),
            **self.calibration_status(),
        }

    def calibration_status(self) -> dict:
        """The profile in use, and how far the measured batch times are from it."""
        if self.planner is None:
            return {}
        cal = self.planner.calibrator
        used = {(w.task, w.variant) for w in self.current.workers.values()} if self.current else set()
        host = cal.host_factor()
        return {"profile": self.planner.profile.source,
                "measured_over_profile": {f"{t}/{v}": round(f, 3) for (t, v), f in sorted(cal.factors().items())
                                          if (t, v) in used},
                "host_factor": None if host is None else round(host, 3),
                "drift_vs_plan": round(cal.drift(), 3)}

    def set_allocations(self, allocations: list[Allocation]) -> None:
        """An operator allocation (plan file or SetPlan) takes over from the planner."""
        self.allocations = allocations
        self.planner = None
        self.dirty = True

    def set_plan_text(self, text: str) -> None:
        self.set_allocations(parse_plan_file(text, self.spec, source="SetPlan"))

    async def set_operator_plan(self, text: str) -> ReconcileResult:
        """``SetPlan``: validate, take over from the planner and publish, as one control
        step (after the one in progress, if any). Raises SpecError for a bad plan."""
        allocations = parse_plan_file(text, self.spec, source="SetPlan")
        async with self._lock:
            self.set_allocations(allocations)
            self.adopted = None      # an operator's plan needs no grace
            return await self._step()

    def _reload_plan_file(self) -> None:
        if self.plan_file is None:
            return
        mtime = self.plan_file.stat().st_mtime
        if mtime != self._plan_file_mtime:
            self.set_allocations(load_plan_file(self.plan_file, self.spec))
            self._plan_file_mtime = mtime
            log.info("plan_file_loaded", path=str(self.plan_file), allocations=len(self.allocations or []))

    def _all_tasks_covered(self, tasks: set[str], pool: int = 0) -> bool:
        """Every task has a worker bound to it or one of the ``pool`` workers to take it."""
        missing = [t.name for t in self.spec.tasks if t.name not in tasks]
        if missing and pool >= len(missing):
            missing = []
        if missing:
            if missing != self._missing_logged:   # once per change, not every loop
                log.info("waiting_for_workers", tasks=missing)
                self._missing_logged = missing
            return False
        self._missing_logged = []
        return True

    def build_plan(self) -> Plan | None:
        if not self.allocations:
            return None
        workers = bind_pool(self.allocations, self.registry.live(), self.current,
                            [t.name for t in self.spec.tasks])
        assignments = assign_workers(self.allocations, workers, self.current)
        if not self._all_tasks_covered({a.task for a in assignments.values()}):
            return None
        plan = Plan(version=0, pipeline=self.spec.name, workers=assignments,
                    routing=uniform_routing(assignments, self.allocations), source="operator")
        validate_plan(plan, self.spec)
        return plan

    async def plan_with_planner(self) -> Plan | None:
        workers = self.registry.live()
        if not self._all_tasks_covered({w.task for w in workers if w.task},
                                       pool=sum(1 for w in workers if not w.task)):
            return None
        if not (self.dirty or self.planner.should_replan(workers, self.demand_qps, self.clock())):
            return None
        # the solve takes up to seconds: off the event loop, so heartbeats keep flowing
        t0 = time.perf_counter()
        plan = await asyncio.to_thread(self.planner.decide, workers, self.demand_qps, self.current,
                                       self.clock())
        self.metrics.solved(time.perf_counter() - t0)
        self.dirty = False
        if plan is not None:
            validate_plan(plan, self.spec)
        return plan

    @staticmethod
    def _same(a: Plan | None, b: Plan) -> bool:
        """``b`` says nothing ``a`` does not: every field but the version and the creation
        time is equal. A plan that changes only rates, latency
        figures or the burst variant is a new plan (routers route on the rates, workers
        seed their batch-time estimates with the figures and spill to the burst variant)."""
        return a is not None and all(getattr(a, f.name) == getattr(b, f.name) for f in fields(Plan)
                                     if f.name not in _NOT_COMPARED)

    async def reconcile(self) -> ReconcileResult:
        """One control step (serialised with every other one)."""
        async with self._lock:
            return await self._step()

    async def _step(self) -> ReconcileResult:
        t0 = time.perf_counter()
        lost: list[str] = []
        published = None
        try:
            lost = self.registry.expire()
            if lost:
                log.warning("workers_lost", workers=lost)
                self.dirty = True
        except Exception:
            log.exception("reconcile_expire_failed")
        try:
            self._reload_plan_file()
        except (SpecError, OSError) as exc:
            log.error("plan_file_invalid", error=str(exc), keeping=self.current.version if self.current else None)
        except Exception:
            log.exception("plan_file_reload_failed")
        if self._waiting_for_adopted_workers():
            pass
        elif self.planner is not None:
            try:
                plan = await self.plan_with_planner()
                if plan is not None and not self._same(self.current, plan):
                    published = await self._publish(plan)
                    self.current = published
            except Exception:
                self.dirty = True
                log.exception("reconcile_plan_failed", keeping=self.current.version if self.current else None)
        elif self.dirty:
            try:
                plan = self.build_plan()
                if plan is not None and not self._same(self.current, plan):
                    published = await self._publish(plan)
                    self.current = published
                self.dirty = plan is None   # keep trying until every task has a worker
            except Exception:
                log.exception("reconcile_publish_failed",
                              keeping=self.current.version if self.current else None)
        result = ReconcileResult(published, lost, (time.perf_counter() - t0) * 1e3)
        try:
            self.metrics.step_done(result.duration_ms / 1e3, published is not None, len(lost))
            self.metrics.update(self)
        except Exception:
            log.exception("reconcile_metrics_failed")
        return result
