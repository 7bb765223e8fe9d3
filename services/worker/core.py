"""The worker's core: one model variant at a time, an EDF queue, dynamic batching,
early dropping, hot swaps. No gRPC here; the servicer adapts it.

Guarantees:
- Every submitted query resolves exactly once: OK with its outputs, DROPPED_DEADLINE,
  INVALID (undecodable payload) or INTERNAL (the batch it ran in failed).
- ONNX Runtime and pre-processing run in executors, never on the event loop.
- A swap loads the new variant while the old one keeps serving; queries prepared for
  the old variant are still executed by it (each queue entry holds its model), so a
  plan change fails no queued request. The old session is freed once drained.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from services.policy.batching import EdfQueue, ServiceTimeEstimator
from services.common.errors import InvalidInput, Unavailable
from services.common.logging import get_logger
from services.common.onnx import create_session
from services.common.processing import ItemResult, Prepared, Processor, make_processor
from services.common.spec import TaskSpec, VariantSpec

log = get_logger(__name__)


class Status(str, Enum):
    OK = "OK"
    DROPPED_DEADLINE = "DROPPED_DEADLINE"
    INVALID = "INVALID"
    INTERNAL = "INTERNAL"


class WorkerState(str, Enum):
    IDLE = "idle"          # no variant assigned yet
    LOADING = "loading"    # first variant loading
    SERVING = "serving"
    SWAPPING = "swapping"  # serving the old variant while the new one loads


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


@dataclass
class ModelHost:
    """One loaded variant: its processor and ONNX Runtime session."""

    variant: VariantSpec
    processor: Processor
    session: object
    providers: list[str]
    estimator: ServiceTimeEstimator = field(default_factory=ServiceTimeEstimator)

    @staticmethod
    def load(variant: VariantSpec, models_dir: Path, prefer_gpu: bool, threads: int) -> "ModelHost":
        processor = make_processor(variant, models_dir)
        session, providers = create_session(processor.model_path, prefer_gpu=prefer_gpu,
                                            intra_op_threads=threads)
        return ModelHost(variant, processor, session, providers)


@dataclass
class _Pending:
    query_id: str
    host: ModelHost
    prepared: Prepared
    enqueued: float
    future: asyncio.Future


class WorkerCore:
    def __init__(self, worker_id: str, task: TaskSpec, models_dir: Path, *, prefer_gpu: bool = True,
                 intra_op_threads: int = 1, clock: Callable[[], float] = time.time,
                 loader: Callable[[VariantSpec], ModelHost] | None = None) -> None:
        self.worker_id = worker_id
        self.task = task
        self.models_dir = Path(models_dir)
        self.clock = clock
        self._loader = loader or (lambda v: ModelHost.load(v, self.models_dir, prefer_gpu, intra_op_threads))
        self.state = WorkerState.IDLE
        self.host: ModelHost | None = None
        self.batch_size = 1
        self.plan_version = 0
        self.queue: EdfQueue[_Pending] = EdfQueue()
        self._wake = asyncio.Event()
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{worker_id}-infer")
        self._prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{worker_id}-prep")
        self._apply_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self.counters = {"arrivals": 0, "completed": 0, "dropped": 0, "errors": 0, "invalid": 0}
        self._batches = 0
        self._batched_items = 0
        self._service_ms_total = 0.0
        self._regions_total = 0

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop(), name="batch-loop")

    async def stop(self) -> None:
        """Resolve everything still queued as INTERNAL (shutdown), stop the loop."""
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        for e in self.queue.drain():
            self._resolve(e.item, Status.INTERNAL, "worker shutting down")
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.host is not None

    async def apply(self, variant_name: str, batch_size: int, plan_version: int) -> bool:
        """Run ``variant_name`` at ``batch_size``. Returns True if the variant changed."""
        async with self._apply_lock:
            self.plan_version = max(self.plan_version, plan_version)
            self.batch_size = max(1, int(batch_size))
            if self.host is not None and self.host.variant.name == variant_name:
                return False
            variant = self.task.variant(variant_name)
            old = self.host
            self.state = WorkerState.SWAPPING if old else WorkerState.LOADING
            log.info("variant_loading", worker_id=self.worker_id, variant=variant_name,
                     previous=old.variant.name if old else None, plan_version=plan_version)
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._loader, variant)
            except Exception:
                self.state = WorkerState.SERVING if old else WorkerState.IDLE
                log.exception("variant_load_failed", worker_id=self.worker_id, variant=variant_name)
                raise
            self.host = new
            self.state = WorkerState.SERVING
            log.info("variant_loaded", worker_id=self.worker_id, variant=variant_name,
                     providers=new.providers, load_ms=round((time.perf_counter() - t0) * 1e3, 1),
                     batch_size=self.batch_size, plan_version=plan_version)
            return True

    # -- data path -----------------------------------------------------------------
    async def submit(self, queries: list[tuple[str, bytes]], deadline_s: float,
                     reserve_s: float = 0.0) -> list[Outcome]:
        host = self.host
        if host is None:
            raise Unavailable(f"worker {self.worker_id} has no model loaded yet")
        self.counters["arrivals"] += len(queries)
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(*[
            loop.run_in_executor(self._prep_pool, contextvars.copy_context().run, host.processor.prepare, p)
            for _, p in queries], return_exceptions=True)
        futures: list[asyncio.Future] = []
        now = self.clock()
        for (qid, _), prep in zip(queries, prepared):
            fut = loop.create_future()
            futures.append(fut)
            if isinstance(prep, InvalidInput):
                self.counters["invalid"] += 1
                fut.set_result(Outcome(qid, Status.INVALID, str(prep), host.variant.name))
            elif isinstance(prep, BaseException):
                self.counters["errors"] += 1
                log.error("prepare_failed", worker_id=self.worker_id, query_id=qid, error=repr(prep))
                fut.set_result(Outcome(qid, Status.INTERNAL, "pre-processing failed", host.variant.name))
            else:
                self.queue.push(_Pending(qid, host, prep, now, fut), deadline_s, reserve_s)
        self._wake.set()
        return list(await asyncio.gather(*futures))

    def _resolve(self, p: _Pending, status: Status, message: str = "", result: ItemResult | None = None,
                 service_ms: float = 0.0, batch_size: int = 0, started: float | None = None) -> None:
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
                                    queue_ms, service_ms, batch_size))

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not len(self.queue):
                self._wake.clear()
                await self._wake.wait()
                continue
            host = self.host
            assert host is not None
            now = self.clock()
            batch, dropped = self.queue.take_batch(now, self.batch_size, host.estimator)
            for e in dropped:
                self._resolve(e.item, Status.DROPPED_DEADLINE, "cannot make its deadline")
            if not batch:
                continue
            # Entries queued before a swap run on the model they were prepared for.
            groups: dict[int, list[_Pending]] = {}
            for e in batch:
                groups.setdefault(id(e.item.host), []).append(e.item)
            for items in groups.values():
                await self._run_group(loop, items)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, items: list[_Pending]) -> None:
        host = items[0].host
        started = self.clock()
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._infer_pool, contextvars.copy_context().run,
                host.processor.run_batch, host.session, [p.prepared for p in items])
            if len(results) != len(items):
                raise RuntimeError(f"processor returned {len(results)} results for {len(items)} items")
        except Exception:
            log.exception("batch_failed", worker_id=self.worker_id, variant=host.variant.name,
                          batch_size=len(items))
            for p in items:
                self._resolve(p, Status.INTERNAL, "model execution failed", started=started)
            return
        elapsed = time.perf_counter() - t0
        host.estimator.observe(len(items), elapsed)
        self._batches += 1
        self._batched_items += len(items)
        self._service_ms_total += elapsed * 1e3
        for p, r in zip(items, results):
            self._regions_total += len(r.regions)
            self._resolve(p, Status.OK, result=r, service_ms=elapsed * 1e3, batch_size=len(items),
                          started=started)

    # -- statistics ----------------------------------------------------------------
    def stats(self) -> dict:
        done = max(1, self._batched_items)
        return {
            "worker_id": self.worker_id,
            "task": self.task.name,
            "variant": self.host.variant.name if self.host else "",
            "batch_size": self.batch_size,
            "plan_version": self.plan_version,
            "providers": list(self.host.providers) if self.host else [],
            "arrivals": self.counters["arrivals"],
            "completed": self.counters["completed"],
            "dropped": self.counters["dropped"],
            "errors": self.counters["errors"] + self.counters["invalid"],
            "queue_length": len(self.queue),
            "mean_service_ms": self._service_ms_total / max(1, self._batches),
            "mean_batch_size": self._batched_items / max(1, self._batches),
            "mean_fan_out": self._regions_total / done,
            "state": self.state.value,
        }
