"""Which models a worker holds and serves, as the plan says: :class:`ModelManager` keeps
the slot table (``slots.py``) in step with each plan (the planned model, the burst
variant, a parked worker's standby) and loads what is missing. Its guarantees are listed
in ``services/worker/core.py``, the core that serves queries on the models it holds."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from enum import Enum
from typing import Awaitable, Callable, Mapping

from services.common.logging import get_logger
from services.common.spec import TaskSpec, VariantSpec
from services.policy.batching import ServiceTimeEstimator
from services.worker.host import ModelHost, release_memory
from services.worker.slots import Key, Reconciled, Role, Slot, SlotTable, Want

log = get_logger(__name__)


class WorkerState(str, Enum):
    IDLE = "idle"          # no plan has named this worker yet
    LOADING = "loading"    # first variant loading (or loading again after parking)
    SERVING = "serving"
    SWAPPING = "swapping"  # serving the old variant while the new one loads
    PARKED = "parked"      # the plan does not need this worker: it serves nothing


class ModelManager:
    """The models of one worker. ``load(variant, max_batch)`` loads and warms a model (in
    a thread), ``size_mb(variant)`` estimates its size for the ``budget_mb`` (0: none);
    ``counters`` (``loads``, ``warm_switches``, ``parks``) are the core's; warm-ups of a
    serving model run through ``exclusive`` (in an inference thread, holding the model
    lock). Plan changes (:meth:`apply`, :meth:`park`) are serialised; burst and standby
    models load in the background, one at a time."""

    def __init__(self, worker_id: str, tasks: Mapping[str, TaskSpec], task: TaskSpec | None, pooled: bool, *,
                 load: Callable[[VariantSpec, int], ModelHost], size_mb: Callable[[VariantSpec], float],
                 linger_s: float, budget_mb: float, burst: bool, counters: dict, metrics,
                 exclusive: Callable[..., Awaitable]) -> None:
        self.worker_id = worker_id
        self.tasks = dict(tasks)
        self.pooled = pooled
        self.task: TaskSpec | None = task   # the task served now (None: a pool worker with no task yet)
        self.host: ModelHost | None = None   # the planned model serving now
        self.state = WorkerState.IDLE
        self.slots = SlotTable(linger_s, budget_mb)
        self.linger_s = linger_s
        self.batch_size = 1
        self.plan_version = 0
        self.last_load_ms = 0.0
        self.burst_enabled = burst
        self.burst_s: list[float] = []     # the burst variant's batch times by batch size (index 0 unused)
        self.standby_batch = 1             # the batch size a standby model is warmed for
        self.counters = counters
        self.metrics = metrics
        self.exclusive = exclusive
        self._load = load
        self._size_mb = size_mb
        self._want = Want()
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None   # loads the burst and standby models

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else ""

    def stop(self) -> None:
        if self._background is not None:
            self._background.cancel()

    @property
    def burst(self) -> ModelHost | None:
        """The burst model of the task served now, when loaded (None while the planned
        model is the one the plan named as burst: a switch to it until ``set_burst``)."""
        burst = self._want.burst
        return None if burst == self._want.serving else self.slots.ready_host(burst)


    async def apply(self, variant_name: str, batch_size: int, plan_version: int,
                    latency_ms: Mapping[int, float] | None = None, task: str | None = None) -> bool:
        """Run ``variant_name`` (of ``task``; default the current task) at ``batch_size``:
        switch to it at once if the slot table holds it ready, wait for it if it is loading
        in the background, else load it (the old model serves meanwhile). ``latency_ms``
        (batch size -> ms, the plan's figures for this variant) seeds the batch-time
        estimate of a model that was not serving. Returns True if the variant changed."""
        async with self._lock:
            self.plan_version = max(self.plan_version, plan_version)
            self.batch_size = max(1, int(batch_size))
            name = task or self.task_name
            if name not in self.tasks:
                raise ValueError(f"worker {self.worker_id} may not serve task {name!r} "
                                 f"(it serves {sorted(self.tasks)})")
            target, key = self.tasks[name], (name, variant_name)
            if self.host is not None and self._want.serving == key:
                await self._warm(self.host)   # a larger batch: its new shapes, in the model's thread
                return False
            variant = target.variant(variant_name)
            old = self.host
            # a standby the plan no longer names is freed; one it names becomes the planned slot
            self._want = replace(self._want, target=key, standby=None)
            slot = self.slots.get(key)
            t0 = time.perf_counter()
            warm = slot is not None and slot.ready
            if not warm:
                self.state = WorkerState.SWAPPING if old else WorkerState.LOADING
                log.info("variant_loading", worker_id=self.worker_id, task=name, variant=variant_name,
                         previous=f"{self.task_name}/{old.variant.name}" if old else None,
                         plan_version=plan_version, in_background=slot is not None)
            try:
                slot = await self._planned_slot(key, variant, slot)
            except Exception:
                self._want = replace(self._want, target=None)
                self._reconcile()
                self.state = WorkerState.SERVING if old else (WorkerState.PARKED if self.counters["parks"]
                                                              else WorkerState.IDLE)
                log.exception("variant_load_failed", worker_id=self.worker_id, variant=variant_name)
                raise
            host = slot.host
            assert host is not None
            if latency_ms:
                host.estimator = ServiceTimeEstimator.seeded({b: ms / 1000.0 for b, ms in latency_ms.items()})
            if warm:
                await self._warm(host)
                self.counters["warm_switches"] += 1
            moved = self.task is not None and self.task.name != name
            self._want = Want(serving=key, burst=None if moved else self._want.burst)
            self.host, self.task = host, target
            self.state = WorkerState.SERVING
            slot.last_used = time.monotonic()
            self._reconcile()    # the old planned model lingers; a burst of another task is freed
            if warm:
                log.info("variant_switched", worker_id=self.worker_id, task=name, variant=variant_name,
                         batch_size=self.batch_size, plan_version=plan_version,
                         switch_ms=round((time.perf_counter() - t0) * 1e3, 1))
            else:
                log.info("variant_loaded", worker_id=self.worker_id, task=name, variant=variant_name,
                         providers=host.providers, load_ms=round(self.last_load_ms, 1),
                         batch_size=self.batch_size, plan_version=plan_version)
            return True

    async def _planned_slot(self, key: Key, variant: VariantSpec, slot: Slot | None) -> Slot:
        """The ready slot of the planned ``key``: the one held, once its background load
        (if any) ended, else a new one loaded now. Raises if the load fails."""
        if slot is not None:
            self._reconcile()          # it is the planned slot now: never evicted or dropped
            await slot.loaded.wait()
            if slot.ready and self.slots.get(key) is slot:
                return slot
            raise RuntimeError(f"the background load of {variant.task}/{variant.name} failed")
        size = self._size_mb(variant)
        fits, evicted = self.slots.make_room(size, force=True)
        self._freed([(s, "memory budget") for s in evicted])
        if not fits:
            log.warning("model_memory_over_budget", worker_id=self.worker_id, variant=variant.name,
                        size_mb=round(size, 1), held_mb=round(self.slots.held_mb, 1),
                        budget_mb=self.slots.budget_mb)
        slot = self.slots.add(key, Role.PLANNED, size, time.monotonic())
        self._reconcile()
        t0 = time.perf_counter()
        try:
            host = await asyncio.to_thread(self._load, variant, self.batch_size)
        except Exception:
            self.slots.remove(slot)
            raise
        self.slots.mark_ready(slot, host, time.monotonic())
        self._loaded(variant, time.perf_counter() - t0)
        return slot

    async def _warm(self, host: ModelHost) -> None:
        if host.needs_warm_up(self.batch_size):
            await self.exclusive(host.warm_up, self.batch_size)

    def _loaded(self, variant: VariantSpec, seconds: float) -> None:
        self.counters["loads"] += 1
        self.last_load_ms = seconds * 1e3
        self.metrics.model_loaded(variant.name, seconds)

    async def park(self, plan_version: int, standby: Key | None = None, standby_batch: int | None = None) -> bool:
        """The plan does not need this worker: stop taking new work on its model, which
        serves what it holds and stale-routed queries for ``linger_s`` and is then freed
        (:meth:`release_lingering`). With ``standby`` (task, variant), load that model in
        the background and keep it ready, warmed for ``standby_batch`` (default: the last
        planned batch size). Returns True if the worker was holding a model."""
        async with self._lock:
            self.plan_version = max(self.plan_version, plan_version)
            if standby is not None and (standby[0] not in self.tasks
                                        or standby[1] not in {v.name for v in self.tasks[standby[0]].variants}):
                log.warning("standby_not_servable", worker_id=self.worker_id, standby=f"{standby[0]}/{standby[1]}",
                            tasks=sorted(self.tasks))
                standby = None
            self._want = Want(standby=standby)
            self.standby_batch = max(1, int(standby_batch or self.batch_size))
            had = self.host is not None
            if had:
                assert self.task is not None
                log.info("worker_parking", worker_id=self.worker_id, task=self.task.name,
                         variant=self.host.variant.name, plan_version=plan_version, linger_s=self.linger_s,
                         standby=f"{standby[0]}/{standby[1]}" if standby else None)
                self.host = None
                self.task = None if self.pooled else self.task
                self.counters["parks"] += 1
            self.state = WorkerState.PARKED
            self._load_missing(self._reconcile())
            return had

    def release_lingering(self, now: float | None = None) -> list[str]:
        """Free the models whose linger has ended (queued queries keep their model alive
        until they ran); one that is the standby stays, as the standby. Returns the tasks
        released."""
        freed = self._reconcile(now).freed
        return [s.task for s, why in freed if why == "linger ended"]

    def set_burst(self, task: str, variant: str | None, latency_ms: Mapping[int, float] | None) -> None:
        """The plan names ``variant`` (None: none) as ``task``'s burst variant, with its
        batch latencies (batch size -> ms). Call it after :meth:`apply` has loaded the
        planned model: the burst model then loads in the background (never before or
        instead of the planned one). A burst variant equal to the planned one, one of
        another task, or one without latency figures (the spill rule needs them) is not
        loaded; a burst model the plan no longer names is freed."""
        want = None
        if (self.burst_enabled and variant and self.host is not None and task == self.task_name
                and variant != self.host.variant.name):
            if not latency_ms:
                log.warning("burst_variant_without_latencies", worker_id=self.worker_id, task=task,
                            variant=variant)
            else:
                want = (task, variant)
                ms = {int(b): float(x) for b, x in latency_ms.items()}
                known = sorted(ms)
                # a batch size the plan has no figure for costs the next one it has (as in the simulator)
                self.burst_s = [0.0] + [ms[next(k for k in known if k >= b)] / 1e3
                                         for b in range(1, known[-1] + 1)]
        if want == self._want.burst:
            return
        self._want = replace(self._want, burst=want)
        self._load_missing(self._reconcile())

    def _reconcile(self, now: float | None = None) -> Reconciled:
        out = self.slots.reconcile(self._want, time.monotonic() if now is None else now)
        self._freed(out.freed)
        return out

    def _freed(self, freed: list[tuple[Slot, str]]) -> None:
        for slot, why in freed:
            log.info("model_released", worker_id=self.worker_id, task=slot.task, variant=slot.variant,
                     role=slot.role.value, why=why)
        if freed:
            release_memory()

    def _load_missing(self, reconciled: Reconciled) -> None:
        if reconciled.missing and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self._load_in_background())

    async def _load_in_background(self) -> None:
        """Load the burst and standby models the plan wants and the table lacks, one at a
        time, until none is missing (a model whose role ended while it loaded is dropped).
        A failed load, or one that does not fit the memory budget, is logged and not tried
        again until a plan names that model anew."""
        while missing := self._reconcile().missing:
            key, role = missing[0]
            variant = self.tasks[key[0]].variant(key[1])
            size = self._size_mb(variant)
            fits, evicted = self.slots.make_room(size, force=False)
            self._freed([(s, "memory budget") for s in evicted])
            if not fits:
                log.warning("model_not_loaded_over_budget", worker_id=self.worker_id, role=role.value,
                            variant=variant.name, size_mb=round(size, 1), budget_mb=self.slots.budget_mb)
                self._forget(key, role)
                continue
            slot = self.slots.add(key, role, size, time.monotonic())
            log.info(f"{role.value}_variant_loading", worker_id=self.worker_id, task=key[0], variant=key[1])
            t0 = time.perf_counter()
            try:
                # a standby is warmed for the batch size chosen at parking (see _on_plan in main.py)
                host = await asyncio.to_thread(self._load, variant,
                                               self.standby_batch if role is Role.STANDBY else self.batch_size)
            except Exception:
                log.exception(f"{role.value}_variant_load_failed", worker_id=self.worker_id, task=key[0],
                              variant=key[1])
                self.slots.remove(slot)
                self._forget(key, role)
                continue
            if self.slots.get(key) is not slot:
                del host        # its role ended while it loaded: dropped (not held through the next load)
                continue
            seconds = time.perf_counter() - t0
            if slot.role is Role.BURST:
                host.estimator = ServiceTimeEstimator.seeded({b: x for b, x in enumerate(self.burst_s) if b})
                self.metrics.model_loaded(variant.name, seconds)
            else:
                self._loaded(variant, seconds)
            self.slots.mark_ready(slot, host, time.monotonic())
            log.info(f"{role.value}_variant_loaded", worker_id=self.worker_id, task=key[0], variant=key[1],
                     load_ms=round(seconds * 1e3, 1))

    def _forget(self, key: Key, role: Role) -> None:
        """No more tries for the burst or standby ``key`` until a plan names it again."""
        if role is Role.BURST and self._want.burst == key:
            self._want = replace(self._want, burst=None)
        elif role is Role.STANDBY and self._want.standby == key:
            self._want = replace(self._want, standby=None)

    def host_for(self, task: str | None) -> ModelHost | None:
        """The model that serves ``task`` now: the planned one, else one still lingering."""
        if task is None or (self.host is not None and self.task_name == task):
            return self.host
        return self.slots.lingering(task)
