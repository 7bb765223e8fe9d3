"""The controller's reconcile loop: workers -> desired allocation -> versioned plan.

Two sources of the allocation: an operator plan file (or ``SetPlan``), or the planner
(``PlannerPolicy``: the CVXPY planner on the estimated demand). Each step runs its
sub-updates (expire lost workers, reload the operator plan file, plan, publish) each in
its own try/except that logs and continues: the loop never dies, and a failed step
keeps the last published plan.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from services.common.errors import SpecError
from services.common.logging import get_logger
from services.common.plan import (Allocation, Plan, assign_workers, load_plan_file, parse_plan_file,
                                  uniform_routing, validate_plan)
from services.common.spec import PipelineSpec
from services.policy.planning import PlannerPolicy
from services.controller.registry import WorkerRegistry

log = get_logger(__name__)


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
        self._plan_file_mtime: float | None = None
        self.allocations: list[Allocation] | None = None
        self.current: Plan | None = None
        self.dirty = True
        self._missing_logged: list[str] = []

    def set_allocations(self, allocations: list[Allocation]) -> None:
        """An operator allocation (plan file or SetPlan) takes over from the planner."""
        self.allocations = allocations
        self.planner = None
        self.dirty = True

    def set_plan_text(self, text: str) -> None:
        self.set_allocations(parse_plan_file(text, self.spec, source="SetPlan"))

    def _reload_plan_file(self) -> None:
        if self.plan_file is None:
            return
        mtime = self.plan_file.stat().st_mtime
        if mtime != self._plan_file_mtime:
            self.set_allocations(load_plan_file(self.plan_file, self.spec))
            self._plan_file_mtime = mtime
            log.info("plan_file_loaded", path=str(self.plan_file), allocations=len(self.allocations or []))

    def _all_tasks_covered(self, tasks: set[str]) -> bool:
        missing = [t.name for t in self.spec.tasks if t.name not in tasks]
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
        workers = self.registry.live()
        assignments = assign_workers(self.allocations, workers, self.current)
        if not self._all_tasks_covered({a.task for a in assignments.values()}):
            return None
        plan = Plan(version=0, pipeline=self.spec.name, workers=assignments,
                    routing=uniform_routing(assignments, self.allocations), source="operator")
        validate_plan(plan, self.spec)
        return plan

    async def plan_with_planner(self) -> Plan | None:
        workers = self.registry.live()
        if not self._all_tasks_covered({w.task for w in workers}):
            return None
        if not (self.dirty or self.planner.should_replan(workers, self.demand_qps, self.clock())):
            return None
        # the solve takes up to seconds: off the event loop, so heartbeats keep flowing
        plan = await asyncio.to_thread(self.planner.decide, workers, self.demand_qps, self.current,
                                       self.clock())
        self.dirty = False
        if plan is not None:
            validate_plan(plan, self.spec)
        return plan

    @staticmethod
    def _same(a: Plan | None, b: Plan) -> bool:
        return a is not None and a.workers == b.workers and a.routing == b.routing \
            and a.admission_rate_qps == b.admission_rate_qps

    async def reconcile(self) -> ReconcileResult:
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
        if self.planner is not None:
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
        return ReconcileResult(published, lost, (time.perf_counter() - t0) * 1e3)
