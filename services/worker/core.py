"""The worker's core: a table of model slots (``slots.py``), an EDF queue and dynamic
batching (``batches.py``), early dropping, hot swaps. No gRPC here; the servicer adapts it.

Guarantees:
- Every submitted query resolves exactly once: OK with its outputs, DROPPED_DEADLINE
  (on arrival, before pre-processing, or when its batch is formed), INVALID
  (undecodable payload) or INTERNAL (the batch it ran in failed); a whole submission
  beyond the queue bound is refused with :class:`Shed` before anything is queued.
- ONNX Runtime runs in an executor, never on the event loop; so does pre-processing,
  unless the model's last ``INLINE_PREP_STREAK`` items each prepared in under
  ``INLINE_PREP_ITEM_S`` (an identity stage, inputs already tensors): then a request of at
  most ``INLINE_PREP_BUDGET_S`` worth of items is prepared on the loop, as a thread
  hand-off costs more than the work (50-90 us); one slower item sends it back to the pool.
- A swap loads the new variant while the old one keeps serving; queries prepared for
  the old variant are still executed by it (each queued group holds its model), so a
  plan change fails no queued request. The old model then *lingers* for ``linger_s``
  (it serves queries a router still sends by the previous plan) and is freed (the ONNX
  Runtime session and its memory: the allocator is asked to return freed pages to the
  OS). A pool worker (several tasks allowed) moves between tasks by the same rule. A
  worker the plan does not need *parks*: its model lingers, then is freed. Queries sent
  to a worker while it loads the model the plan gave it wait for the load (within their
  deadline) instead of failing.
- Switching to a model the table holds ready (lingering, standby, burst) costs no load
  (counted in ``warm_switches``; ``loads`` counts the loads).
- Standby (``Plan.standby``): a parked worker the plan names loads that model in the
  background and keeps it ready; it stays parked (serves nothing, reports ``parked``).
  A plan that gives it that model switches to it at once; a plan that no longer names it
  frees it; a failed standby load is logged and leaves the worker parked.
- Burst variant (``Plan.burst``): once the planned model is loaded, the worker loads the
  plan's burst variant for its task (its cheapest capacity) beside it, in the background,
  and frees it when the plan stops naming it or the worker parks or moves. When the queue
  says the plan is overrun (``services.policy.batching.overrun``) the next batch runs on
  it (``burst_batch`` size), its items re-prepared from their raw payloads by the burst
  variant's processor (inputs differ between variants); its results and batch timings
  carry the burst variant's name, its estimator is its own. Without it nothing spills.
- ``model_memory_mb`` (0: no budget) bounds the models held, by their files' sizes: past
  it the least recently used lingering and standby models are freed (never the planned
  or burst one); a burst or standby model that does not fit is not loaded.
- The batching rule and the drop test are the policy package's
  (``services.policy.batching``), the same code the simulator runs; the batch-time
  estimate starts from the plan's latency figures for the variant when it has them.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

from services.common.errors import InvalidInput, Shed, Unavailable
from services.common.logging import get_logger
from services.common.metrics import WorkerMetrics
from services.common.onnx import DEFAULT_CUDNN_ALGO_SEARCH
from services.common.spec import TaskSpec, VariantSpec
from services.policy.batching import burst_batch, cannot_make_it, overrun
from services.worker.batches import BatchLoop, Outcome, Pending, Status
from services.worker.timings import TimedSession as _TimedSession  # noqa: F401 - bench/bench_worker.py
from services.worker.timings import run_timed as _run_timed  # noqa: F401 - tests/unit/test_latency_breakdown.py
from services.worker.host import ModelHost, model_file_mb, prepare_all, warm_batch_sizes
from services.worker.manager import ModelManager, WorkerState
from services.worker.slots import Key
from services.worker.timings import BatchTiming, TimingBook

__all__ = ["DEFAULT_LINGER_S", "DEFAULT_MAX_QUEUE", "BatchTiming", "ModelHost", "Outcome", "Status",
           "WorkerCore", "WorkerState", "warm_batch_sizes"]

log = get_logger(__name__)

DEFAULT_MAX_QUEUE = 1024   # queries; beyond it a submission is shed (RESOURCE_EXHAUSTED)
DEFAULT_LINGER_S = 3.0     # a model the plan moved away from still serves stale-routed queries this long


class WorkerCore:
    """``task`` is the task a task-bound worker serves; a pool worker gets ``tasks``
    (every task it may serve, e.g. the pipeline's) and ``task`` None (or the task it
    starts on), and serves whatever task the plan gives it (``apply(..., task=)``).
    ``loader(variant)`` replaces the ONNX Runtime load (tests), ``model_size_mb(variant)``
    the size estimate (default: the model file's size). The models it holds are its
    :class:`ModelManager`'s (``self.models``); the queue and inference thread its
    :class:`BatchLoop`'s (``self.batches``)."""

    def __init__(self, worker_id: str, task: TaskSpec | None, models_dir: Path, *, prefer_gpu: bool = True,
                 intra_op_threads: int = 1, clock: Callable[[], float] = time.time,
                 loader: Callable[[VariantSpec], ModelHost] | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, plugins: tuple[str, ...] = (),
                 prep_threads: int = 2, tasks: Mapping[str, TaskSpec] | None = None,
                 linger_s: float = DEFAULT_LINGER_S, burst: bool = True,
                 cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH, batch_padding: str = "auto",
                 model_memory_mb: float = 0.0,
                 model_size_mb: Callable[[VariantSpec], float] | None = None) -> None:
        if task is None and not tasks:
            raise ValueError("a worker needs a task or a set of tasks it may serve")
        self._worker_id = worker_id
        allowed: dict[str, TaskSpec] = dict(tasks) if tasks else {task.name: task}
        if task is not None:
            allowed.setdefault(task.name, task)
        self.models_dir = Path(models_dir)
        self.clock = clock
        self.max_queue = max_queue
        self.counters = {"arrivals": 0, "completed": 0, "dropped": 0, "errors": 0, "invalid": 0, "shed": 0,
                         "loads": 0, "warm_switches": 0, "parks": 0, "spilled": 0, "queued_ahead": 0,
                         "prepared_inline": 0}
        self.metrics = WorkerMetrics(self)   # counters, queue, state read when scraped
        self._timings = TimingBook()
        self.batches = BatchLoop(worker_id, clock, self.counters, self.metrics, self._timings,
                                 lambda: self.models.batch_size, self._spill)
        self.queue = self.batches.queue
        self.models = ModelManager(
            worker_id, allowed, task, len(allowed) > 1 or tasks is not None,
            # a model is warmed for batches up to the size given with its load
            load=(lambda v, b: loader(v)) if loader is not None else
                 (lambda v, b: ModelHost.load(v, self.models_dir, prefer_gpu, intra_op_threads, plugins, b,
                                              cudnn_conv_algo_search, batch_padding)),
            size_mb=model_size_mb or (lambda v: model_file_mb(self.models_dir, v)),
            linger_s=linger_s, budget_mb=model_memory_mb, burst=burst, counters=self.counters,
            metrics=self.metrics, exclusive=self.batches.exclusive)
        self.prep_threads = max(1, int(prep_threads))
        self._prep_pool = ThreadPoolExecutor(max_workers=self.prep_threads, thread_name_prefix=f"{worker_id}-prep")
        self._reserve_s = 0.0               # the downstream reserve the current task's queries carry

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @worker_id.setter
    def worker_id(self, value: str) -> None:   # known once the server bound its port
        self._worker_id = self.batches.worker_id = self.models.worker_id = value

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self.batches.start()

    @property
    def loop_restarts(self) -> int:
        return self.batches.restarts

    async def stop(self) -> None:
        """Resolve everything still queued as INTERNAL (shutdown), stop the loops."""
        self.models.stop()
        await self.batches.stop()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    # -- what the plan gave it (the ModelManager's) -----------------------------------------
    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return self.models.tasks

    @property
    def task(self) -> TaskSpec | None:
        return self.models.task

    @property
    def task_name(self) -> str:
        return self.models.task_name

    @property
    def host(self) -> ModelHost | None:
        """The planned model serving now (None: none loaded yet, or parked)."""
        return self.models.host

    @property
    def burst(self) -> ModelHost | None:
        return self.models.burst

    @property
    def burst_enabled(self) -> bool:
        return self.models.burst_enabled

    @property
    def state(self) -> WorkerState:
        return self.models.state

    @property
    def batch_size(self) -> int:
        return self.models.batch_size

    @property
    def plan_version(self) -> int:
        return self.models.plan_version

    @property
    def last_load_ms(self) -> float:
        return self.models.last_load_ms

    @property
    def ready(self) -> bool:
        return self.host is not None

    @property
    def waiting(self) -> int:
        return self.batches.waiting

    def may_serve(self, task: str) -> bool:
        return task in self.tasks

    async def apply(self, variant_name: str, batch_size: int, plan_version: int,
                    latency_ms: Mapping[int, float] | None = None, task: str | None = None) -> bool:
        """:meth:`ModelManager.apply`: serve ``variant_name`` of ``task`` at ``batch_size``."""
        return await self.models.apply(variant_name, batch_size, plan_version, latency_ms, task)

    async def park(self, plan_version: int, standby: Key | None = None, standby_batch: int | None = None) -> bool:
        """:meth:`ModelManager.park`: serve nothing, keep ``standby`` ready."""
        return await self.models.park(plan_version, standby, standby_batch)

    def set_burst(self, task: str, variant: str | None, latency_ms: Mapping[int, float] | None) -> None:
        """:meth:`ModelManager.set_burst`: the plan's burst variant for ``task``."""
        self.models.set_burst(task, variant, latency_ms)

    def release_lingering(self, now: float | None = None) -> list[str]:
        """:meth:`ModelManager.release_lingering`: free models whose linger ended."""
        return self.models.release_lingering(now)

    # -- data path -----------------------------------------------------------------
    def _spill(self, host: ModelHost) -> tuple[ModelHost, int] | None:
        """(the burst model, its batch size) when the queue headed by ``host``'s queries says
        the plan is overrun (``services.policy.batching.overrun``); else None."""
        burst, q, size = self.burst, self.queue, self.batch_size
        if burst is None or host is not self.host or q.queued <= size:
            return None
        head = q.peek_deadline()
        planned_s = host.estimator(size)
        if head is None or not overrun(self.clock(), q.queued, size, planned_s, head, q.last_deadline,
                                       self._reserve_s):
            return None
        burst_s = self.models.burst_s
        return burst, burst_batch(burst_s, len(burst_s) - 1, planned_s)

    def _host_for(self, task: str | None) -> ModelHost | None:
        return self.models.host_for(task)

    async def _await_load(self, task: str | None, deadline_s: float) -> None:
        """Wait (within the deadline) for the planned model of ``task`` that is loading now."""
        slot = self.models.slots.loading_planned(task)
        timeout = deadline_s - self.clock()
        if slot is None or timeout <= 0:
            return
        try:
            await asyncio.wait_for(slot.loaded.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def submit(self, queries: list[tuple[str, bytes]], deadline_s: float,
                     reserve_s: float = 0.0, task: str | None = None) -> list[Outcome]:
        """Queue ``queries`` of ``task`` (default: the task served now). Raises
        :class:`Unavailable` when the worker holds no model of that task (not yet loaded,
        parked, moved away longer than its linger ago): the router then tries another."""
        host = self._host_for(task)
        if host is None:
            await self._await_load(task, deadline_s)
            host = self._host_for(task)
        if host is None:
            what = f"task {task!r}" if task else "a model"
            why = "parked" if self.state is WorkerState.PARKED else "not loaded"
            raise Unavailable(f"worker {self.worker_id} holds no model of {what} ({why})")
        arrived = time.perf_counter()
        n = len(queries)
        if self.waiting + n > self.max_queue:
            self.counters["shed"] += n
            raise Shed(f"worker queue full ({self.waiting} queued, bound {self.max_queue})")
        self.counters["arrivals"] += n
        self.models.slots.touch(host, time.monotonic())
        if host is self.host:
            self._reserve_s = reserve_s
        now = self.clock()
        if cannot_make_it(now, host.estimator(1), reserve_s, deadline_s):
            # dropped on arrival: not even pre-processed
            self.counters["dropped"] += n
            return [Outcome(qid, Status.DROPPED_DEADLINE, "cannot make its deadline", host.variant.name)
                    for qid, _ in queries]
        loop = asyncio.get_running_loop()
        payloads = [p for _, p in queries]
        t_prep = time.perf_counter()
        if host.prepare_inline(n):
            prepared = prepare_all(host.processor.prepare, payloads)
            self.counters["prepared_inline"] += n
        else:
            # one executor call per slice of the request, not per query: a thread hand-off
            # costs ~50 us, as much as preparing a small crop (at most prep_threads slices)
            k = -(-n // min(n, self.prep_threads))
            slices = await asyncio.gather(*[
                loop.run_in_executor(self._prep_pool, contextvars.copy_context().run, prepare_all,
                                     host.processor.prepare, payloads[i:i + k])
                for i in range(0, n, k)])
            prepared = [x for part in slices for x in part]
        prep_wall_s = time.perf_counter() - t_prep
        host.observe_prepare(prepared)
        now = self.clock()
        groups: dict = {}   # shape bucket -> its queries: a batch holds one bucket
        outcomes: list[Outcome | asyncio.Future] = []
        for (qid, payload), prep in zip(queries, prepared):
            if isinstance(prep, InvalidInput):
                self.counters["invalid"] += 1
                outcomes.append(Outcome(qid, Status.INVALID, str(prep), host.variant.name))
            elif isinstance(prep, BaseException):
                self.counters["errors"] += 1
                log.error("prepare_failed", worker_id=self.worker_id, query_id=qid, error=repr(prep))
                outcomes.append(Outcome(qid, Status.INTERNAL, "pre-processing failed", host.variant.name))
            else:
                p = Pending(qid, host, prep[0], now, prep[1], loop.create_future(), arrived, prep_wall_s, payload)
                groups.setdefault(getattr(prep[0], "bucket", None), deque()).append(p)
                outcomes.append(p.future)
        for bucket, group in groups.items():
            self.queue.push(group, deadline_s, reserve_s, len(group), bucket)
        if groups:
            self.batches.queued()
        return [o if isinstance(o, Outcome) else await o for o in outcomes]

    # -- statistics ----------------------------------------------------------------
    def take_timings(self) -> list[BatchTiming]:
        """The batch timings since the last call (the heartbeat reports them once)."""
        return self._timings.take()

    def restore_timings(self, timings: list[BatchTiming]) -> None:
        """Put back timings whose report failed, so the next heartbeat carries them."""
        self._timings.restore(timings)

    def stats(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "task": self.task_name,
            "variant": self.host.variant.name if self.host else "",
            "batch_size": self.batch_size,
            "plan_version": self.plan_version,
            "providers": list(self.host.providers) if self.host else [],
            "arrivals": self.counters["arrivals"],
            "completed": self.counters["completed"],
            "dropped": self.counters["dropped"],
            "errors": self.counters["errors"] + self.counters["invalid"],
            "shed": self.counters["shed"],
            "queue_length": self.waiting,
            "state": self.state.value,
            "loads": self.counters["loads"],
            "last_load_ms": self.last_load_ms,
            **self.running_batch(),
        }

    def running_batch(self) -> dict:
        """The batch in the inference thread: how long it has run and its expected time."""
        return self.batches.running_batch()
