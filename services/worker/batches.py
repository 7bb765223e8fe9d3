"""The worker's batch loop: it takes batches off the EDF queue, runs them in the single
inference thread and resolves each query's outcome. Which model a batch spills to, the
planned batch size and the queue bound are the core's (``services/worker/core.py``).

Guarantees:
- Every query queued here resolves exactly once: OK, DROPPED_DEADLINE (when its batch is
  formed) or INTERNAL (the batch it ran in failed, the loop died, the worker stopped).
- The loop runs supervised (``services.common.tasks``): if it ever dies it is logged and
  restarted, and the queries of the batch it held are resolved INTERNAL, so nothing hangs.
- Each queued query holds the model it was prepared for and runs on it, whatever the
  plan says meanwhile; no local variable of the loop outlives its batch, so a model the
  slot table frees is no longer referenced once its last batch ran.
- One model call at a time: a batch holds the model lock from its start (assembling its
  inputs) until its model call (``session.run``) returns, then post-processes without it.
  A full batch queued behind the running one (``_prefetch``) runs in a second inference
  thread, so its assembly and model call overlap the first batch's post-processing (on a
  GPU the model runs while the CPU decodes). A batch's time, estimate and timings run
  from when it took the lock to its last result, as when batches ran one after the other.
"""
from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from services.common.logging import get_logger
from services.common.processing import ItemResult, Prepared
from services.common.tasks import supervise
from services.policy.batching import EdfQueue
from services.worker.host import ModelHost, prepare_all
from services.worker.timings import BatchPhases, TimingBook, run_timed

log = get_logger(__name__)

REPORT_AFTER_BATCHES = 3   # a new variant's first batches are not reported (caches still warming)


class Status(str, Enum):
    OK = "OK"
    DROPPED_DEADLINE = "DROPPED_DEADLINE"
    INVALID = "INVALID"
    INTERNAL = "INTERNAL"


@dataclass
class Outcome:
    query_id: str
    status: Status
    message: str = ""
    variant: str = ""
    result: ItemResult | None = None
    queue_ms: float = 0.0
    service_ms: float = 0.0
    batch_size: int = 0
    phases: BatchPhases | None = None   # where the batch's time went (OK outcomes)
    preprocess_ms: float = 0.0   # the submission's pre-processing (wall)
    worker_ms: float = 0.0       # arrival in submit() to the outcome


@dataclass
class Pending:
    query_id: str
    host: ModelHost
    prepared: Prepared
    enqueued: float
    prepare_s: float
    future: asyncio.Future
    arrived: float = 0.0        # perf_counter() at submit()
    prep_wall_s: float = 0.0    # the submission's pre-processing, wall time
    payload: bytes = b""        # the raw input: a batch spilled to the burst variant re-prepares it


@dataclass
class Launch:
    """A batch handed to the inference thread and not finished yet."""

    items: list[Pending]
    future: asyncio.Future      # of run_timed's result
    started: float              # clock() when handed over (or when its batch began)
    t0: float                   # perf_counter() of the same moment
    behind: bool = False        # queued behind another batch (started when the thread took it up)
    estimate_s: float = 0.0     # its expected run time
    began: float = 0.0          # perf_counter() when it took the model lock (set by its thread)


# host -> (burst host, batch size) when a batch headed by host's queries spills, else None
SpillRule = Callable[[ModelHost], "tuple[ModelHost, int] | None"]


class BatchLoop:
    """The EDF queue and the inference thread. ``batch_size()`` is the plan's batch size
    now; ``spill(host)`` says whether the next batch runs on the burst model instead."""

    def __init__(self, worker_id: str, clock: Callable[[], float], counters: dict, metrics, timings: TimingBook,
                 batch_size: Callable[[], int], spill: SpillRule) -> None:
        self.worker_id = worker_id
        self.clock = clock
        self.counters = counters
        self.metrics = metrics
        self.timings = timings
        self.batch_size = batch_size
        self.spill = spill
        self.queue: EdfQueue[deque[Pending]] = EdfQueue()
        self.wake = asyncio.Event()
        # two threads: a batch queued behind the running one starts on the model while the
        # running one post-processes; the lock keeps model calls one at a time
        self.infer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{worker_id}-infer")
        self.model_lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._holding: list[Pending] = []     # the batch being taken (resolved INTERNAL if the loop dies)
        self._running: Launch | None = None   # the batch in the inference thread
        self._next: list[Launch] = []         # batches queued behind it (prefetch)

    def start(self) -> None:
        if self._task is None:
            self._task = supervise("batch-loop", self._run)

    @property
    def restarts(self) -> int:
        return self._task.supervisor.restarts if self._task else 0   # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop the loop; everything still queued resolves INTERNAL (shutdown)."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for group, n in self.queue.drain():
            for _ in range(n):
                self.resolve(group.popleft(), Status.INTERNAL, "worker shutting down")
        self.infer_pool.shutdown(wait=False, cancel_futures=True)

    async def exclusive(self, fn: Callable, *args):
        """``fn(*args)`` in an inference thread, holding the model lock (a warm-up: no batch
        runs meanwhile)."""
        def locked():
            with self.model_lock:
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.infer_pool, contextvars.copy_context().run,
                                                                locked)

    @property
    def waiting(self) -> int:
        """Queries waiting for the model: queued, or in a batch queued behind the running one."""
        return self.queue.queued + sum(len(launch.items) for launch in self._next)

    def queued(self) -> None:
        """Queries were pushed: wake the loop, and queue a full batch behind the running one."""
        self.wake.set()
        self._prefetch()

    def resolve(self, p: Pending, status: Status, message: str = "", result: ItemResult | None = None,
                service_ms: float = 0.0, batch_size: int = 0, started: float | None = None,
                phases: BatchPhases | None = None) -> None:
        if p.future.done():
            return
        queue_ms = ((started if started is not None else self.clock()) - p.enqueued) * 1e3
        if status is Status.DROPPED_DEADLINE:
            self.counters["dropped"] += 1
        elif status is Status.OK:
            self.counters["completed"] += 1
        else:
            self.counters["errors"] += 1
        p.future.set_result(Outcome(p.query_id, status, message, p.host.variant.name, result,
                                    queue_ms, service_ms, batch_size, phases, p.prep_wall_s * 1e3,
                                    (time.perf_counter() - p.arrived) * 1e3 if p.arrived else 0.0))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._next:
                    await self._finish_next()
                    continue
                if not self.queue.queued:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                await self._next_batch(loop)
        finally:
            # the loop is ending (crash or stop): nothing it held may hang
            for launch in ([self._running] if self._running else []) + self._next:
                self._holding.extend(launch.items)
            for p in self._holding:
                self.resolve(p, Status.INTERNAL, "batch loop failed")
            self._holding, self._running, self._next = [], None, []

    def _drop(self, dropped) -> None:
        for group, n in dropped:
            for _ in range(n):
                self.resolve(group.popleft(), Status.DROPPED_DEADLINE, "cannot make its deadline")

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take and run one batch. (A method of its own so that its locals, which hold
        models, are gone once it returns: a parked worker's model must be freeable.)"""
        # the batch is timed by the model of its earliest query (after a move or while
        # parked, queued queries still run on the model they were prepared for)
        host = self.queue.peek()[0].host
        spill = self.spill(host)
        if spill is None:
            batch, dropped = self.queue.take_batch(self.clock(), self.batch_size(), host.estimator)
        else:
            # overrun: this batch runs on the burst variant, as many as fit in the time of a
            # planned batch, each dropped or kept by the burst variant's estimates
            batch, dropped = self.queue.take_batch(self.clock(), spill[1], spill[0].estimator)
        self._drop(dropped)
        self._holding = [group.popleft() for group, n in batch for _ in range(n)]
        # Entries queued before a swap run on the model they were prepared for.
        by_host: dict[int, list[Pending]] = {}
        for p in self._holding:
            by_host.setdefault(id(p.host), []).append(p)
        for items in by_host.values():
            if spill is not None and items[0].host is host:
                self.counters["spilled"] += 1
                await self._run_spilled(loop, spill[0], items)
            else:
                await self._run_group(loop, items, prefetch=len(by_host) == 1)
        self._holding = []

    async def _finish_next(self) -> None:
        """Finish the batch queued behind the last one in the inference thread (the thread
        has started on it already, without waiting for this loop). A method of its own, as
        ``_next_batch``: the batch, which holds its model, must not stay in the loop's locals."""
        await self._finish(self._next.pop(0), prefetch=not self._next)

    def _prefetch(self) -> None:
        """While a batch runs in the inference thread, queue the next one behind it when a
        full batch is waiting: the thread starts on it as soon as it is free, without a
        round trip through this event loop (~0.3-0.6 ms per batch on a busy 2-core host,
        a quarter of a small recogniser's batch). A partial batch is not taken early: it
        waits for the thread to be free, as arrivals until then may fill it. The batch
        is formed, and its members dropped or kept, as of when it is expected to start
        (the running batch's estimated end); batches that spill to the burst variant are
        not queued ahead (they are re-prepared first)."""
        running, size = self._running, self.batch_size()
        if running is None or self._next or self.queue.queued < size:
            return
        host = self.queue.peek()[0].host
        if self.spill(host) is not None:
            return
        left_s = max(0.0, running.estimate_s - (time.perf_counter() - running.began))
        batch, dropped = self.queue.take_batch(self.clock() + left_s, size, host.estimator)
        self._drop(dropped)
        by_host: dict[int, list[Pending]] = {}
        for group, n in batch:
            for _ in range(n):
                p = group.popleft()
                by_host.setdefault(id(p.host), []).append(p)
        loop = asyncio.get_running_loop()
        self._next = [self._launch(loop, items, behind=True) for items in by_host.values()]
        self.counters["queued_ahead"] += len(self._next)

    async def _run_spilled(self, loop: asyncio.AbstractEventLoop, burst: ModelHost, items: list[Pending]) -> None:
        """Run ``items`` (prepared for the planned variant) on the burst variant: re-prepare
        each from its raw payload with the burst variant's processor (input sizes differ
        between variants), in the inference thread (a batch's time includes its items'
        pre-processing, as in the profile), then run them as its batch."""
        started = self.clock()
        t0 = time.perf_counter()
        try:
            prepared = await loop.run_in_executor(self.infer_pool, contextvars.copy_context().run, prepare_all,
                                                  burst.processor.prepare, [p.payload for p in items])
        except Exception:
            log.exception("burst_prepare_failed", worker_id=self.worker_id, variant=burst.variant.name)
            prepared = [RuntimeError("re-preparation failed")] * len(items)
        ready: list[Pending] = []
        for p, prep in zip(items, prepared):
            p.host = burst     # its outcome and timings carry the burst variant's name
            if isinstance(prep, BaseException):
                # it was prepared for the planned variant: a failure here is the worker's, not the input's
                log.error("burst_prepare_failed", worker_id=self.worker_id, query_id=p.query_id,
                          variant=burst.variant.name, error=repr(prep))
                self.resolve(p, Status.INTERNAL, "pre-processing for the burst variant failed", started=started)
            else:
                p.prepared, p.prepare_s = prep
                ready.append(p)
        if ready:
            await self._run_group(loop, ready, started=started, t0=t0)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, items: list[Pending],
                         started: float | None = None, t0: float | None = None, prefetch: bool = False) -> None:
        """Run ``items`` as one batch on their host (``started``/``t0``: when the batch
        began, if before this call: a spilled batch's re-preparation counts). With
        ``prefetch``, a full batch waiting meanwhile is queued behind it (``_prefetch``)."""
        await self._finish(self._launch(loop, items, started=started, t0=t0), prefetch=prefetch)

    def _launch(self, loop: asyncio.AbstractEventLoop, items: list[Pending], *, started: float | None = None,
                t0: float | None = None, behind: bool = False) -> Launch:
        """Hand ``items`` to the inference thread as one batch on their host."""
        host = items[0].host
        t0 = time.perf_counter() if t0 is None else t0
        launch = Launch(items, loop.create_future(), self.clock() if started is None else started, t0, behind,
                        host.estimator(len(items)), began=t0)

        def began(t: float) -> None:   # in the inference thread, once it holds the model lock
            launch.began = t

        launch.future = loop.run_in_executor(self.infer_pool, contextvars.copy_context().run,
                                             run_timed, host.processor.run_batch, host.session,
                                             [p.prepared for p in items], self.model_lock, began)
        return launch

    async def _finish(self, launch: Launch, prefetch: bool = False) -> None:
        """Wait for ``launch``'s batch and resolve its items; meanwhile (``prefetch``) the
        next full batch may be queued behind it."""
        items = launch.items
        host = items[0].host
        self._running = launch   # left set if this is cancelled: the loop's end resolves its items
        if prefetch:
            self._prefetch()
        try:
            results, run_s, phases, began = await launch.future
            if len(results) != len(items):
                raise RuntimeError(f"processor returned {len(results)} results for {len(items)} items")
        except Exception:
            self._running = None
            log.exception("batch_failed", worker_id=self.worker_id, variant=host.variant.name,
                          batch_size=len(items))
            for p in items:
                self.resolve(p, Status.INTERNAL, "model execution failed", started=launch.started)
            return
        self._running = None
        started, t0 = launch.started, launch.t0
        if launch.behind and began > t0:
            # queued behind another batch: its time runs from when the thread took it up
            started, t0 = started + (began - t0), began
        elapsed = time.perf_counter() - t0
        host.estimator.observe(len(items), elapsed)
        host.batches += 1
        self.metrics.batch(host.variant.name, len(items), run_s)
        if host.batches > REPORT_AFTER_BATCHES:
            # what the batch cost the host: its model time (timed in the executor thread,
            # not counting the event loop's hand-offs) and its items' pre-processing
            regions = sum(len(r.regions) for r in results)
            self.timings.record(host.variant.task, host.variant.name, len(items),
                                run_s + sum(p.prepare_s for p in items), regions)
        for p, r in zip(items, results):
            self.resolve(p, Status.OK, result=r, service_ms=elapsed * 1e3, batch_size=len(items),
                         started=started, phases=phases)

    def running_batch(self) -> dict:
        """The batch in the inference thread: how long it has run and its expected time
        (a model call that never returns shows as a growing ``batch_running_s``; the
        controller plans without the worker then, services/policy/health.py)."""
        running = self._running
        if running is None:
            return {"batch_running_s": 0.0, "batch_expected_s": 0.0}
        return {"batch_running_s": max(0.0, time.perf_counter() - running.began),
                "batch_expected_s": running.estimate_s}
