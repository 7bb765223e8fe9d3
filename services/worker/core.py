"""The worker's core: one model variant at a time, an EDF queue, dynamic batching,
early dropping, hot swaps. No gRPC here; the servicer adapts it.

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
- The batch loop runs supervised (``services.common.tasks``): if it ever dies it is
  logged and restarted, and the queries of the batch it held are resolved INTERNAL, so
  nothing hangs.
- A swap loads the new variant while the old one keeps serving; queries prepared for
  the old variant are still executed by it (each queued group holds its model), so a
  plan change fails no queued request. The old session is freed once drained.
- A pool worker (several tasks allowed) moves between tasks by the same rule: the new
  task's model loads while the old one serves, queued queries finish on the model they
  were prepared for, and the old task's model stays for ``linger_s`` for queries a router
  still sends by the previous plan. A worker the plan does not need *parks*: it keeps
  serving what it holds, then, after ``linger_s``, drops its model (the ONNX Runtime
  session and its memory: the allocator is asked to return freed pages to the OS).
  Queries sent to a worker while it loads the model the plan gave it wait for the load
  (within their deadline) instead of failing.
- Burst variant (``Plan.burst``): once the planned model is loaded, the worker loads the
  plan's burst variant for its task (its cheapest capacity) beside it, in the background,
  and frees it when the plan stops naming it or the worker parks or moves. When the queue
  says the plan is overrun (``services.policy.batching.overrun``) the next batch runs on
  it (``burst_batch`` size), its items re-prepared from their raw payloads by the burst
  variant's processor (inputs differ between variants); its results and batch timings
  carry the burst variant's name, its estimator is its own. Without it nothing spills.
- The batching rule and the drop test are the policy package's
  (``services.policy.batching``), the same code the simulator runs; the batch-time
  estimate starts from the plan's latency figures for the variant when it has them.
"""
from __future__ import annotations

import asyncio
import contextvars
import gc
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping

from services.common.errors import InvalidInput, Shed, Unavailable
from services.common.logging import get_logger
from services.common.memory import malloc_trim
from services.common.metrics import WorkerMetrics
from services.common.onnx import (DEFAULT_CUDNN_ALGO_SEARCH, BatchPaddedSession, create_session, padded_batch,
                                  pads_batches)
from services.common.processing import ItemResult, Prepared, Processor, make_processor
from services.common.spec import TaskSpec, VariantSpec
from services.common.tasks import supervise
from services.policy.batching import EdfQueue, ServiceTimeEstimator, burst_batch, cannot_make_it, overrun

log = get_logger(__name__)

DEFAULT_MAX_QUEUE = 1024   # queries; beyond it a submission is shed (RESOURCE_EXHAUSTED)
DEFAULT_LINGER_S = 3.0     # a model the plan moved away from still serves stale-routed queries this long
REPORT_AFTER_BATCHES = 3   # a new variant's first batches are not reported (caches still warming)
INLINE_PREP_ITEM_S = 20e-6  # an item prepared faster than this is "cheap" (a hand-off costs 50-90 us)
INLINE_PREP_STREAK = 32     # cheap items in a row before a model's inputs are prepared on the loop
INLINE_PREP_BUDGET_S = 100e-6   # at most this much preparing on the loop per request (5 cheap items)


class Status(str, Enum):
    OK = "OK"
    DROPPED_DEADLINE = "DROPPED_DEADLINE"
    INVALID = "INVALID"
    INTERNAL = "INTERNAL"


class WorkerState(str, Enum):
    IDLE = "idle"          # no plan has named this worker yet
    LOADING = "loading"    # first variant loading (or loading again after parking)
    SERVING = "serving"
    SWAPPING = "swapping"  # serving the old variant while the new one loads
    PARKED = "parked"      # the plan does not need this worker: no model held


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
    phases: "BatchPhases | None" = None   # where the batch's time went (OK outcomes)
    preprocess_ms: float = 0.0   # the submission's pre-processing (wall)
    worker_ms: float = 0.0       # arrival in submit() to the outcome


@dataclass
class BatchPhases:
    """Where one batch's time went, measured in the thread that ran it: the batch's
    assembly before the first model run (stacking, padding), the model runs (ONNX
    Runtime), the crop encoding the processor reported (``ItemResult.encode_s``), and
    the rest of the post-processing after the model."""

    assemble_ms: float = 0.0
    model_ms: float = 0.0
    postprocess_ms: float = 0.0
    encode_ms: float = 0.0


class _TimedSession:
    """An ONNX Runtime session as a processor sees it, timing its ``run`` calls (one
    per batch, made in the inference thread; the rest is passed through)."""

    __slots__ = ("_session", "run_s", "first_start")

    def __init__(self, session: object) -> None:
        self._session = session
        self.run_s = 0.0
        self.first_start: float | None = None

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        if self.first_start is None:
            self.first_start = t0
        try:
            return self._session.run(*args, **kwargs)   # type: ignore[attr-defined]
        finally:
            self.run_s += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self._session, name)


@dataclass
class ModelHost:
    """One loaded variant: its processor and ONNX Runtime session."""

    variant: VariantSpec
    processor: Processor
    session: object
    providers: list[str]
    estimator: ServiceTimeEstimator = field(default_factory=ServiceTimeEstimator)
    batches: int = 0          # batches run on this host (the first few are not reported)
    cheap_prep_streak: int = 0   # items in a row prepared in under INLINE_PREP_ITEM_S
    warmed: set = field(default_factory=set)   # (shape bucket, batch size) run by warm_up
    warm_items: list | None = None   # warm_up's inputs, one per bucket (None: never warmed)
    padded: bool = False      # the session pads batch sizes to powers of two (BatchPaddedSession)

    def prepare_inline(self, n: int) -> bool:
        """Whether a request of ``n`` items is prepared on the event loop (see the module
        docstring): the thread hand-off would cost more than the work."""
        return self.cheap_prep_streak >= INLINE_PREP_STREAK and n * INLINE_PREP_ITEM_S <= INLINE_PREP_BUDGET_S

    def observe_prepare(self, prepared: list) -> None:
        for item in prepared:
            cheap = not isinstance(item, BaseException) and item[1] < INLINE_PREP_ITEM_S
            self.cheap_prep_streak = self.cheap_prep_streak + 1 if cheap else 0

    @staticmethod
    def load(variant: VariantSpec, models_dir: Path, prefer_gpu: bool, threads: int,
             plugins: tuple[str, ...] = (), max_batch: int = 1,
             cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH,
             batch_padding: str = "auto") -> "ModelHost":
        processor = make_processor(variant, models_dir, plugins)
        session, providers = create_session(processor.model_path, prefer_gpu=prefer_gpu,
                                            intra_op_threads=threads,
                                            cudnn_conv_algo_search=cudnn_conv_algo_search)
        padded = pads_batches(batch_padding, providers)
        host = ModelHost(variant, processor, BatchPaddedSession(session) if padded else session, providers,
                         padded=padded)
        host.warm_up(max_batch)
        return host

    def warm_up(self, max_batch: int = 1) -> None:
        """Before the host serves: run the processor's warm-up inputs (one per shape bucket)
        at the batch sizes :func:`warm_batch_sizes` gives for ``max_batch``, each once (the
        first twice: a fresh session's first runs allocate); pairs run before are skipped.
        On a GPU every new input shape costs a cuDNN algorithm search."""
        if self.warm_items is None:
            self.warm_items = self.processor.warmup_items()
        sizes = warm_batch_sizes(max_batch, "CUDAExecutionProvider" in self.providers, self.padded)
        for item in self.warm_items:
            for b in sizes:
                if (item.bucket, b) not in self.warmed:
                    for _ in range(1 if self.warmed else 2):
                        self.processor.run_batch(self.session, [item] * b)
                    self.warmed.add((item.bucket, b))

    def needs_warm_up(self, max_batch: int) -> bool:
        """Whether batches up to ``max_batch`` would meet a shape :meth:`warm_up` has not run."""
        return bool(self.warm_items) and any(
            (it.bucket, b) not in self.warmed for it in self.warm_items
            for b in warm_batch_sizes(max_batch, "CUDAExecutionProvider" in self.providers, self.padded))


def warm_batch_sizes(max_batch: int, gpu: bool, padded: bool = False) -> tuple[int, ...]:
    """The batch sizes a model is warmed at for batches of up to ``max_batch``: on a GPU
    every size (the work-conserving batcher runs partial batches, and each size is a new
    shape to cuDNN), or with batch padding (:class:`BatchPaddedSession`) the powers of two
    up to it, the only sizes ONNX Runtime then sees; on a CPU batch 1 only: there a new
    shape costs about one more run (an allocation, not a search), and warming rec_v6small's
    4 buckets at batch 32 took 10 s of CPU (docs/gpu.md)."""
    top = max(1, int(max_batch))
    if not gpu:
        return (1,)
    if padded:
        return tuple(1 << k for k in range(padded_batch(top).bit_length()))
    return tuple(range(1, top + 1))


@dataclass
class _Pending:
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
class _Launch:
    """A batch handed to the inference thread and not finished yet."""

    items: list[_Pending]
    future: asyncio.Future      # of _run_timed's result
    started: float              # clock() when handed over (or when its batch began)
    t0: float                   # perf_counter() of the same moment
    behind: bool = False        # queued behind another batch (started when the thread took it up)
    estimate_s: float = 0.0     # its expected run time
    began: float = 0.0          # perf_counter() when it became the batch in the thread, as this loop saw it


@dataclass
class BatchTiming:
    """What batches of one (variant, batch size) cost since the last report: the sum of
    the batch's model time and its items' pre-processing time (the profile's
    definition of a batch latency), and the regions its items produced."""

    variant: str
    batch_size: int
    count: int = 0
    task: str = ""
    total_ms: float = 0.0
    max_ms: float = 0.0
    items: int = 0
    regions: int = 0


class WorkerCore:
    """``task`` is the task a task-bound worker serves; a pool worker gets ``tasks``
    (every task it may serve, e.g. the pipeline's) and ``task`` None (or the task it
    starts on), and serves whatever task the plan gives it (``apply(..., task=)``)."""

    def __init__(self, worker_id: str, task: TaskSpec | None, models_dir: Path, *, prefer_gpu: bool = True,
                 intra_op_threads: int = 1, clock: Callable[[], float] = time.time,
                 loader: Callable[[VariantSpec], ModelHost] | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, plugins: tuple[str, ...] = (),
                 prep_threads: int = 2, tasks: Mapping[str, TaskSpec] | None = None,
                 linger_s: float = DEFAULT_LINGER_S, burst: bool = True,
                 cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH, batch_padding: str = "auto") -> None:
        if task is None and not tasks:
            raise ValueError("a worker needs a task or a set of tasks it may serve")
        self.worker_id = worker_id
        self.tasks: dict[str, TaskSpec] = dict(tasks) if tasks else {task.name: task}
        if task is not None:
            self.tasks.setdefault(task.name, task)
        self.pooled = len(self.tasks) > 1 or tasks is not None
        self.task: TaskSpec | None = task   # the task served now (None: a pool worker with no task yet)
        self.models_dir = Path(models_dir)
        self.clock = clock
        self.max_queue = max_queue
        self.linger_s = linger_s
        # a model is warmed for the batch size of the plan that loads it (set before the load)
        self._loader = loader or (lambda v: ModelHost.load(v, self.models_dir, prefer_gpu, intra_op_threads,
                                                          plugins, self.batch_size, cudnn_conv_algo_search,
                                                          batch_padding))
        self.state = WorkerState.IDLE
        self.host: ModelHost | None = None
        # hosts submissions may still use: the current one, and ones the plan moved away
        # from, until their linger ends (task -> (host, monotonic time it may be freed))
        self._lingering: dict[str, tuple[ModelHost, float]] = {}
        self._loading: tuple[str, asyncio.Future] | None = None   # (task, done) while a load runs
        self.batch_size = 1
        self.plan_version = 0
        self.queue: EdfQueue[deque[_Pending]] = EdfQueue()
        self._wake = asyncio.Event()
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{worker_id}-infer")
        self.prep_threads = max(1, int(prep_threads))
        self._prep_pool = ThreadPoolExecutor(max_workers=self.prep_threads, thread_name_prefix=f"{worker_id}-prep")
        self._apply_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self._holding: list[_Pending] = []     # the batch being taken (resolved INTERNAL if the loop dies)
        self._running: _Launch | None = None   # the batch in the inference thread
        self._next: list[_Launch] = []         # batches queued behind it (_prefetch)
        self.counters = {"arrivals": 0, "completed": 0, "dropped": 0, "errors": 0, "invalid": 0, "shed": 0,
                         "loads": 0, "parks": 0, "spilled": 0, "queued_ahead": 0,
                         "prepared_inline": 0}
        self.last_load_ms = 0.0
        # the plan's burst variant for the current task (None: none named, or burst off)
        self.burst_enabled = burst
        self.burst: ModelHost | None = None
        self._burst_want: tuple[str, str] | None = None   # (task, variant) the plan names
        self._burst_s: list[float] = []     # its batch times by batch size (index 0 unused)
        self._burst_load: asyncio.Task | None = None
        self._reserve_s = 0.0               # the downstream reserve the current task's queries carry
        self._timings: dict[tuple[str, str, int], BatchTiming] = {}
        self.metrics = WorkerMetrics(self)   # counters, queue, state read when scraped

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = supervise("batch-loop", self._batch_loop)

    @property
    def loop_restarts(self) -> int:
        return self._loop_task.supervisor.restarts if self._loop_task else 0   # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Resolve everything still queued as INTERNAL (shutdown), stop the loop."""
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        if self._burst_load is not None:
            self._burst_load.cancel()
        for group, n in self.queue.drain():
            for _ in range(n):
                self._resolve(group.popleft(), Status.INTERNAL, "worker shutting down")
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.host is not None

    @property
    def waiting(self) -> int:
        """Queries waiting for the model: queued, or in a batch queued behind the running one."""
        return self.queue.queued + sum(len(launch.items) for launch in self._next)

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else ""

    def may_serve(self, task: str) -> bool:
        return task in self.tasks

    async def apply(self, variant_name: str, batch_size: int, plan_version: int,
                    latency_ms: Mapping[int, float] | None = None, task: str | None = None) -> bool:
        """Run ``variant_name`` (of ``task``; default the current task) at ``batch_size``.
        ``latency_ms`` (batch size -> ms, the plan's figures for this variant) seeds the
        batch-time estimate of a newly loaded variant. Returns True if the variant changed."""
        async with self._apply_lock:
            self.plan_version = max(self.plan_version, plan_version)
            self.batch_size = max(1, int(batch_size))
            name = task or self.task_name
            if name not in self.tasks:
                raise ValueError(f"worker {self.worker_id} may not serve task {name!r} "
                                 f"(it serves {sorted(self.tasks)})")
            target = self.tasks[name]
            if self.host is not None and self.host.variant.name == variant_name and self.task_name == name:
                if self.host.needs_warm_up(self.batch_size):   # a larger batch: its new shapes, in the model's thread
                    await asyncio.get_running_loop().run_in_executor(self._infer_pool, self.host.warm_up,
                                                                     self.batch_size)
                return False
            variant = target.variant(variant_name)
            old, old_task = self.host, self.task
            self.state = WorkerState.SWAPPING if old else WorkerState.LOADING
            log.info("variant_loading", worker_id=self.worker_id, task=name, variant=variant_name,
                     previous=f"{old_task.name}/{old.variant.name}" if old and old_task else None,
                     plan_version=plan_version)
            done = asyncio.get_running_loop().create_future()
            self._loading = (name, done)
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._loader, variant)
            except Exception:
                self.state = WorkerState.SERVING if old else (WorkerState.PARKED if self.counters["parks"]
                                                              else WorkerState.IDLE)
                log.exception("variant_load_failed", worker_id=self.worker_id, variant=variant_name)
                raise
            finally:
                self._loading = None
                if not done.done():
                    done.set_result(None)
            if latency_ms:
                new.estimator = ServiceTimeEstimator.seeded({b: ms / 1000.0 for b, ms in latency_ms.items()})
            if old_task is not None and old_task.name != name:
                self._drop_burst("moved to another task")
            if old is not None and old_task is not None and old_task.name != name:
                # moved to another task: the old model still serves stale-routed queries a while
                self._lingering[old_task.name] = (old, time.monotonic() + self.linger_s)
            self._lingering.pop(name, None)
            self.host, self.task = new, target
            self.state = WorkerState.SERVING
            self.counters["loads"] += 1
            self.last_load_ms = (time.perf_counter() - t0) * 1e3
            self.metrics.model_loaded(variant_name, self.last_load_ms / 1e3)
            log.info("variant_loaded", worker_id=self.worker_id, task=name, variant=variant_name,
                     providers=new.providers, load_ms=round(self.last_load_ms, 1),
                     batch_size=self.batch_size, plan_version=plan_version)
            return True

    async def park(self, plan_version: int) -> bool:
        """The plan does not need this worker: stop taking new work on its model, which
        serves what it holds and stale-routed queries for ``linger_s`` and is then freed
        (:meth:`release_lingering`). Returns True if the worker was holding a model."""
        async with self._apply_lock:
            self.plan_version = max(self.plan_version, plan_version)
            self._drop_burst("parked")
            if self.host is None:
                self.state = WorkerState.PARKED
                return False
            assert self.task is not None
            self._lingering[self.task.name] = (self.host, time.monotonic() + self.linger_s)
            log.info("worker_parking", worker_id=self.worker_id, task=self.task.name,
                     variant=self.host.variant.name, plan_version=plan_version, linger_s=self.linger_s)
            self.host = None
            self.task = None if self.pooled else self.task
            self.state = WorkerState.PARKED
            self.counters["parks"] += 1
            return True

    def release_lingering(self, now: float | None = None) -> list[str]:
        """Free the models whose linger has ended (queued queries keep their model alive
        until they ran). Returns the tasks released."""
        now = time.monotonic() if now is None else now
        gone = [t for t, (_, until) in self._lingering.items() if until <= now]
        for t in gone:
            host, _ = self._lingering.pop(t)
            log.info("model_released", worker_id=self.worker_id, task=t, variant=host.variant.name)
            del host
        if gone:
            release_memory()
        return gone

    # -- burst variant ---------------------------------------------------------------
    def set_burst(self, task: str, variant: str | None, latency_ms: Mapping[int, float] | None) -> None:
        """The plan names ``variant`` (None: none) as ``task``'s burst variant, with its
        batch latencies (batch size -> ms). Call it after :meth:`apply` has loaded the
        planned model: the burst model then loads in the background (never before or
        instead of the planned one). A burst variant equal to the planned one, one of
        another task, or one without latency figures (the spill rule needs them) is not
        loaded; a burst model the plan no longer names is dropped."""
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
                self._burst_s = [0.0] + [ms[next(k for k in known if k >= b)] / 1e3
                                         for b in range(1, known[-1] + 1)]
        if want == self._burst_want:
            return
        self._drop_burst("no longer named by the plan")
        self._burst_want = want
        if want is not None and (self._burst_load is None or self._burst_load.done()):
            self._burst_load = asyncio.ensure_future(self._load_burst())

    async def _load_burst(self) -> None:
        """Load the burst variant the plan names now (again if it changed meanwhile)."""
        while self._burst_want is not None and self.burst is None:
            want = self._burst_want
            task, name = want
            t0 = time.perf_counter()
            log.info("burst_variant_loading", worker_id=self.worker_id, task=task, variant=name)
            try:
                host = await asyncio.to_thread(self._loader, self.tasks[task].variant(name))
            except Exception:
                log.exception("burst_variant_load_failed", worker_id=self.worker_id, task=task, variant=name)
                if self._burst_want == want:
                    self._burst_want = None   # no burst until a plan names one again
                return
            if self._burst_want != want:
                continue        # the plan changed while it loaded: discard it, load what it names now
            host.estimator = ServiceTimeEstimator.seeded({b: x for b, x in enumerate(self._burst_s) if b})
            self.burst = host
            seconds = time.perf_counter() - t0
            self.metrics.model_loaded(name, seconds)
            log.info("burst_variant_loaded", worker_id=self.worker_id, task=task, variant=name,
                     load_ms=round(seconds * 1e3, 1))

    def _drop_burst(self, why: str) -> None:
        """Forget the burst model (a batch running on it keeps it until that batch ends)."""
        self._burst_want = None
        if self.burst is not None:
            log.info("burst_variant_released", worker_id=self.worker_id, variant=self.burst.variant.name,
                     why=why)
            self.burst = None
            release_memory()

    def _spill_to(self, host: ModelHost) -> ModelHost | None:
        """The burst model, when the queue headed by ``host``'s queries says the plan is
        overrun (``services.policy.batching.overrun``); else None."""
        burst, q = self.burst, self.queue
        if burst is None or host is not self.host or q.queued <= self.batch_size:
            return None
        head = q.peek_deadline()
        if head is None or not overrun(self.clock(), q.queued, self.batch_size, host.estimator(self.batch_size),
                                       head, q.last_deadline, self._reserve_s):
            return None
        return burst

    def _host_for(self, task: str | None) -> ModelHost | None:
        """The model that serves ``task`` now: the current one, else one still lingering."""
        if task is None:
            return self.host
        if self.host is not None and self.task_name == task:
            return self.host
        held = self._lingering.get(task)
        return held[0] if held else None

    async def _await_load(self, task: str | None, deadline_s: float) -> None:
        """Wait (within the deadline) for the model of ``task`` that is loading now."""
        loading = self._loading
        if loading is None or (task is not None and loading[0] != task):
            return
        timeout = deadline_s - self.clock()
        if timeout <= 0:
            return
        try:
            await asyncio.wait_for(asyncio.shield(loading[1]), timeout)
        except asyncio.TimeoutError:
            pass

    # -- data path -----------------------------------------------------------------
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
            prepared = _prepare_all(host.processor.prepare, payloads)
            self.counters["prepared_inline"] += n
        else:
            # one executor call per slice of the request, not per query: a thread hand-off
            # costs ~50 us, as much as preparing a small crop (at most prep_threads slices)
            k = -(-n // min(n, self.prep_threads))
            slices = await asyncio.gather(*[
                loop.run_in_executor(self._prep_pool, contextvars.copy_context().run, _prepare_all,
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
                p = _Pending(qid, host, prep[0], now, prep[1], loop.create_future(), arrived, prep_wall_s, payload)
                groups.setdefault(getattr(prep[0], "bucket", None), deque()).append(p)
                outcomes.append(p.future)
        for bucket, group in groups.items():
            self.queue.push(group, deadline_s, reserve_s, len(group), bucket)
        if groups:
            self._wake.set()
            self._prefetch()
        return [o if isinstance(o, Outcome) else await o for o in outcomes]

    def _resolve(self, p: _Pending, status: Status, message: str = "", result: ItemResult | None = None,
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

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._next:
                    await self._finish_next()
                    continue
                if not self.queue.queued:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._next_batch(loop)
        finally:
            # the loop is ending (crash or stop): nothing it held may hang
            for launch in ([self._running] if self._running else []) + self._next:
                self._holding.extend(launch.items)
            for p in self._holding:
                self._resolve(p, Status.INTERNAL, "batch loop failed")
            self._holding, self._running, self._next = [], None, []

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take and run one batch. (A method of its own so that its locals, which hold
        models, are gone once it returns: a parked worker's model must be freeable.)"""
        # the batch is timed by the model of its earliest query (after a move or while
        # parked, queued queries still run on the model they were prepared for)
        host = self.queue.peek()[0].host
        burst = self._spill_to(host)
        if burst is None:
            batch, dropped = self.queue.take_batch(self.clock(), self.batch_size, host.estimator)
        else:
            # overrun: this batch runs on the burst variant, as many as fit in the time of a
            # planned batch, each dropped or kept by the burst variant's estimates
            size = burst_batch(self._burst_s, len(self._burst_s) - 1, host.estimator(self.batch_size))
            batch, dropped = self.queue.take_batch(self.clock(), size, burst.estimator)
        for group, n in dropped:
            for _ in range(n):
                self._resolve(group.popleft(), Status.DROPPED_DEADLINE, "cannot make its deadline")
        self._holding = [group.popleft() for group, n in batch for _ in range(n)]
        # Entries queued before a swap run on the model they were prepared for.
        by_host: dict[int, list[_Pending]] = {}
        for p in self._holding:
            by_host.setdefault(id(p.host), []).append(p)
        for items in by_host.values():
            if burst is not None and items[0].host is host:
                self.counters["spilled"] += 1
                await self._run_spilled(loop, burst, items)
            else:
                await self._run_group(loop, items, prefetch=len(by_host) == 1)
        self._holding = []

    async def _finish_next(self) -> None:
        """Finish the batch queued behind the last one in the inference thread (the thread
        has started on it already, without waiting for this loop). A method of its own, as
        ``_next_batch``: the batch, which holds its model, must not stay in the loop's locals."""
        launch = self._next.pop(0)
        launch.began = time.perf_counter()
        await self._finish(launch, prefetch=not self._next)

    def _prefetch(self) -> None:
        """While a batch runs in the inference thread, queue the next one behind it when a
        full batch is waiting: the thread starts on it as soon as it is free, without a
        round trip through this event loop (~0.3-0.6 ms per batch on a busy 2-core host,
        a quarter of a small recogniser's batch). A partial batch is not taken early: it
        waits for the thread to be free, as arrivals until then may fill it. The batch
        is formed, and its members dropped or kept, as of when it is expected to start
        (the running batch's estimated end); batches that spill to the burst variant are
        not queued ahead (they are re-prepared first)."""
        running = self._running
        if running is None or self._next or self.queue.queued < self.batch_size:
            return
        host = self.queue.peek()[0].host
        if self._spill_to(host) is not None:
            return
        left_s = max(0.0, running.estimate_s - (time.perf_counter() - running.began))
        batch, dropped = self.queue.take_batch(self.clock() + left_s, self.batch_size, host.estimator)
        for group, n in dropped:
            for _ in range(n):
                self._resolve(group.popleft(), Status.DROPPED_DEADLINE, "cannot make its deadline")
        by_host: dict[int, list[_Pending]] = {}
        for group, n in batch:
            for _ in range(n):
                p = group.popleft()
                by_host.setdefault(id(p.host), []).append(p)
        loop = asyncio.get_running_loop()
        self._next = [self._launch(loop, items, behind=True) for items in by_host.values()]
        self.counters["queued_ahead"] += len(self._next)

    async def _run_spilled(self, loop: asyncio.AbstractEventLoop, burst: ModelHost, items: list[_Pending]) -> None:
        """Run ``items`` (prepared for the planned variant) on the burst variant: re-prepare
        each from its raw payload with the burst variant's processor (input sizes differ
        between variants), in the inference thread (a batch's time includes its items'
        pre-processing, as in the profile), then run them as its batch."""
        started = self.clock()
        t0 = time.perf_counter()
        try:
            prepared = await loop.run_in_executor(self._infer_pool, contextvars.copy_context().run, _prepare_all,
                                                  burst.processor.prepare, [p.payload for p in items])
        except Exception:
            log.exception("burst_prepare_failed", worker_id=self.worker_id, variant=burst.variant.name)
            prepared = [RuntimeError("re-preparation failed")] * len(items)
        ready: list[_Pending] = []
        for p, prep in zip(items, prepared):
            p.host = burst     # its outcome and timings carry the burst variant's name
            if isinstance(prep, BaseException):
                # it was prepared for the planned variant: a failure here is the worker's, not the input's
                log.error("burst_prepare_failed", worker_id=self.worker_id, query_id=p.query_id,
                          variant=burst.variant.name, error=repr(prep))
                self._resolve(p, Status.INTERNAL, "pre-processing for the burst variant failed", started=started)
            else:
                p.prepared, p.prepare_s = prep
                ready.append(p)
        if ready:
            await self._run_group(loop, ready, started=started, t0=t0)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, items: list[_Pending],
                         started: float | None = None, t0: float | None = None, prefetch: bool = False) -> None:
        """Run ``items`` as one batch on their host (``started``/``t0``: when the batch
        began, if before this call: a spilled batch's re-preparation counts). With
        ``prefetch``, a full batch waiting meanwhile is queued behind it (``_prefetch``)."""
        await self._finish(self._launch(loop, items, started=started, t0=t0), prefetch=prefetch)

    def _launch(self, loop: asyncio.AbstractEventLoop, items: list[_Pending], *, started: float | None = None,
                t0: float | None = None, behind: bool = False) -> "_Launch":
        """Hand ``items`` to the inference thread as one batch on their host."""
        host = items[0].host
        t0 = time.perf_counter() if t0 is None else t0
        future = loop.run_in_executor(self._infer_pool, contextvars.copy_context().run,
                                      _run_timed, host.processor.run_batch, host.session,
                                      [p.prepared for p in items])
        return _Launch(items, future, self.clock() if started is None else started, t0, behind,
                       host.estimator(len(items)), began=t0)

    async def _finish(self, launch: "_Launch", prefetch: bool = False) -> None:
        """Wait for ``launch``'s batch and resolve its items; meanwhile (``prefetch``) the
        next full batch may be queued behind it."""
        items = launch.items
        host = items[0].host
        self._running = launch   # left set if this is cancelled: the batch loop's end resolves its items
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
                self._resolve(p, Status.INTERNAL, "model execution failed", started=launch.started)
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
            self._record(host.variant.task, host.variant.name, len(items), run_s + sum(p.prepare_s for p in items),
                         regions)
        for p, r in zip(items, results):
            self._resolve(p, Status.OK, result=r, service_ms=elapsed * 1e3, batch_size=len(items),
                          started=started, phases=phases)

    # -- statistics ----------------------------------------------------------------
    def _record(self, task: str, variant: str, size: int, work_s: float, regions: int) -> None:
        t = self._timings.get((task, variant, size))
        if t is None:
            t = self._timings[(task, variant, size)] = BatchTiming(variant, size, task=task)
        ms = work_s * 1e3
        t.count += 1
        t.total_ms += ms
        t.max_ms = max(t.max_ms, ms)
        t.items += size
        t.regions += regions

    def take_timings(self) -> list[BatchTiming]:
        """The batch timings since the last call (the heartbeat reports them once)."""
        out = list(self._timings.values())
        self._timings = {}
        return out

    def restore_timings(self, timings: list[BatchTiming]) -> None:
        """Put back timings whose report failed, so the next heartbeat carries them."""
        for t in timings:
            cur = self._timings.get((t.task, t.variant, t.batch_size))
            if cur is None:
                self._timings[(t.task, t.variant, t.batch_size)] = t
            else:
                cur.count += t.count
                cur.total_ms += t.total_ms
                cur.max_ms = max(cur.max_ms, t.max_ms)
                cur.items += t.items
                cur.regions += t.regions

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
        """The batch in the inference thread: how long it has run and its expected time
        (a model call that never returns shows as a growing ``batch_running_s``; the
        controller plans without the worker then, services/policy/health.py)."""
        running = self._running
        if running is None:
            return {"batch_running_s": 0.0, "batch_expected_s": 0.0}
        return {"batch_running_s": max(0.0, time.perf_counter() - running.began),
                "batch_expected_s": running.estimate_s}


def release_memory() -> None:
    """Collect garbage and ask glibc's allocator to return freed pages to the OS, so a
    freed model shows up as lower RSS (no-op where there is no ``malloc_trim``)."""
    gc.collect()
    malloc_trim()


def _prepare_all(prepare: Callable[[bytes], Prepared], payloads: list[bytes]) -> list:
    """``(prepared, seconds)`` per payload, or the exception ``prepare`` raised for it."""
    out: list = []
    for payload in payloads:
        t0 = time.perf_counter()
        try:
            out.append((prepare(payload), time.perf_counter() - t0))
        except Exception as exc:   # noqa: BLE001 - one bad payload fails its query only
            out.append(exc)
    return out


def _run_timed(run_batch: Callable, session: object, items: list[Prepared]
               ) -> tuple[list[ItemResult], float, BatchPhases, float]:
    """``(run_batch(session, items), seconds it took, where they went, perf_counter() at
    its start)``, timed in the thread that runs it; the session's ``run`` calls are timed
    through a wrapper."""
    timed = _TimedSession(session)
    t0 = time.perf_counter()
    results = run_batch(timed, items)
    total = time.perf_counter() - t0
    assemble = (timed.first_start - t0) if timed.first_start is not None else 0.0
    encode = sum(getattr(r, "encode_s", 0.0) for r in results)
    post = max(0.0, total - assemble - timed.run_s - encode)
    return results, total, BatchPhases(assemble * 1e3, timed.run_s * 1e3, post * 1e3, encode * 1e3), t0
