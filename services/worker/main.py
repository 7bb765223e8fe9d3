"""``pipeserve-worker``: serve model variants as the plan says: of one task (``--task``),
or, as a pool worker (no ``--task``), of whichever task of the pipeline the plan gives it;
a worker the plan does not need parks (frees its model) until the plan needs it again."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.errors import SpecError
from services.common.grpc_utils import (TlsConfig, add_tls_arguments, bind, make_channel, make_server,
                                        tls_from_args, tls_mode)
from services.common.logging import configure_logging, get_logger
from services.common.metrics import MetricsServer, add_metrics_argument, serve_metrics
from services.common.onnx import BATCH_PADDING, CUDNN_ALGO_SEARCH, DEFAULT_CUDNN_ALGO_SEARCH
from services.common.plan import Plan, validate_plan
from services.common.plan_channel import PlanSubscriber
from services.common.redis_auth import RedisAuthError, check_credentials
from services.common.spec import load_spec
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.common.tasks import stop_tasks, supervise
from services.common.eventloop import EventLoopError, run_service
from services.common.memory import IdleTrimmer, MallocTuningError, tune_malloc, tuned
from services.worker.core import DEFAULT_LINGER_S, DEFAULT_MAX_QUEUE, WorkerCore
from services.worker.servicer import WorkerServicer, stats_to_proto

log = get_logger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    spec: Path
    task: str            # "" = a pool worker (any task of the spec)
    worker_id: str
    host: str
    port: int
    advertise: str
    controller: str
    redis_url: str
    models: Path
    device: str
    intra_op_threads: int
    heartbeat_s: float
    max_queue: int
    prep_threads: int
    json_logs: bool
    tls: TlsConfig | None = None   # its server and its channel to the controller
    linger_s: float = DEFAULT_LINGER_S
    metrics_port: int | None = None   # Prometheus /metrics (None: off)
    burst: bool = True   # load the plan's burst variant beside the planned one and spill to it
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH   # the CUDA provider's, per new input shape
    batch_padding: str = "auto"   # pad batch sizes to powers of two (auto: on the CUDA provider)
    model_memory_mb: float = 0.0   # the models held, by their files' sizes (0: no budget)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-worker",
        description="Serve pipeline tasks with ONNX Runtime. The worker registers with the "
                    "controller, follows the versioned plan in Redis to learn which task, variant "
                    "and batch size to run, and reports its statistics by heartbeat. Without "
                    "--task it is a pool worker: the plan moves it between tasks and parks it "
                    "(its model freed) when demand does not need it. Its gRPC health status is "
                    "NOT_SERVING until it has followed a plan (loaded a model or parked).")
    p.add_argument("--spec", required=True, help="pipeline spec file (e.g. pipelines/ocr.yaml)")
    p.add_argument("--task", default="",
                   help="bind the worker to this task (e.g. det); default: a pool worker that "
                        "serves whichever task of the spec the plan gives it (an operator limits a "
                        "worker to one task with this, e.g. on a host without the right GPU)")
    p.add_argument("--worker-id", default=None,
                   help="unique id (default: <task or 'pool'>-<hostname>-<port>)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind, 0 = any free port (default)")
    p.add_argument("--advertise", default=None,
                   help="address routers use to reach this worker (default host:bound-port)")
    p.add_argument("--controller", required=True, help="controller address host:port")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="URL of the Redis holding the plan, e.g. redis://:PASSWORD@host:6379/0 or "
                        "rediss://... for TLS (default $REDIS_URL, better for a URL with a "
                        "password: command lines are visible to local users)")
    p.add_argument("--models", default="models", help="directory with the model files (make models)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"],
                   help="auto: CUDA provider first when present; cpu: CPU only")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads (default 1: workers share the cores)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat period in seconds")
    p.add_argument("--prep-threads", type=int, default=2,
                   help="threads that decode and pre-process queries beside the model's thread "
                        "(default 2)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="queries the worker queues at most; a request beyond it is shed with "
                        f"RESOURCE_EXHAUSTED (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--linger-s", type=float, default=DEFAULT_LINGER_S,
                   help="after the plan moves or parks the worker, its previous model still serves "
                        "queries routed by the previous plan this long before it is freed "
                        f"(default {DEFAULT_LINGER_S})")
    p.add_argument("--burst", choices=("on", "off"), default="on",
                   help="keep the plan's burst variant for the worker's task (Plan.burst, its "
                        "cheapest capacity) loaded beside the planned one, after it, and run the "
                        "next batch on it when the queue says the plan is overrun (default on)")
    p.add_argument("--cudnn-conv-algo-search", type=str.upper,
                   default=os.environ.get("PIPESERVE_CUDNN_CONV_ALGO_SEARCH", DEFAULT_CUDNN_ALGO_SEARCH),
                   help=f"how cuDNN picks convolution algorithms for each new input shape on the CUDA "
                        f"provider: {', '.join(CUDNN_ALGO_SEARCH)} (default $PIPESERVE_CUDNN_CONV_ALGO_SEARCH "
                        f"or {DEFAULT_CUDNN_ALGO_SEARCH}; the worker warms every shape bucket and batch size "
                        f"before it serves; choose by measuring on the GPU, docs/gpu.md)")
    p.add_argument("--batch-padding", choices=BATCH_PADDING,
                   default=os.environ.get("PIPESERVE_BATCH_PADDING", "auto"),
                   help="feed ONNX Runtime power-of-two batch sizes only, padding a batch with copies of "
                        "its last item and dropping their outputs, so a GPU meets (and warms) log2(batch)+1 "
                        "shapes per bucket instead of every size; auto (default, or "
                        "$PIPESERVE_BATCH_PADDING): on the CUDA provider only")
    p.add_argument("--model-memory-mb", type=float, default=0.0,
                   help="memory budget, in MB, for the models the worker holds at once (the planned "
                        "one, the burst variant, a parked worker's standby, and models the plan moved "
                        "away from that still serve for --linger-s), each counted by its ONNX file's "
                        "size; past it the least recently used lingering and standby models are freed "
                        "first, and a burst or standby model that does not fit is not loaded (the "
                        "planned one always is). Default 0: no budget")
    p.add_argument("--log-json", action="store_true", default=os.environ.get("PIPESERVE_LOG_JSON") == "1",
                   help="log JSON lines instead of key=value")
    add_metrics_argument(p)
    add_tls_arguments(p)
    return p


def parse_config(argv: list[str] | None = None) -> WorkerConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.redis_url:
        p.error("--redis-url (or REDIS_URL) is required")
    tls = tls_from_args(a, p)
    if a.cudnn_conv_algo_search not in CUDNN_ALGO_SEARCH:
        p.error(f"--cudnn-conv-algo-search (or PIPESERVE_CUDNN_CONV_ALGO_SEARCH) must be one of "
                f"{', '.join(CUDNN_ALGO_SEARCH)}, got {a.cudnn_conv_algo_search!r}")
    if a.model_memory_mb < 0:
        p.error(f"--model-memory-mb must be >= 0 (0: no budget), got {a.model_memory_mb}")
    if a.batch_padding not in BATCH_PADDING:   # argparse checks choices of a flag, not of $PIPESERVE_BATCH_PADDING
        p.error(f"--batch-padding (or PIPESERVE_BATCH_PADDING) must be one of {', '.join(BATCH_PADDING)}, "
                f"got {a.batch_padding!r}")
    return WorkerConfig(
        spec=Path(a.spec), task=a.task, worker_id=a.worker_id or "", host=a.host, port=a.port,
        advertise=a.advertise or "", controller=a.controller, redis_url=a.redis_url,
        models=Path(a.models), device=a.device, intra_op_threads=a.intra_op_threads,
        heartbeat_s=a.heartbeat_s, max_queue=a.max_queue, prep_threads=a.prep_threads, json_logs=a.log_json, tls=tls,
        linger_s=a.linger_s, metrics_port=a.metrics_port, burst=a.burst == "on",
        cudnn_conv_algo_search=a.cudnn_conv_algo_search, batch_padding=a.batch_padding,
        model_memory_mb=a.model_memory_mb)


class WorkerApp:
    """Wires the core to gRPC, the controller and the plan channel."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.spec = load_spec(cfg.spec)
        task = None
        if cfg.task:
            try:
                task = self.spec.task(cfg.task)
            except KeyError as exc:
                raise SystemExit(f"error: {exc.args[0]}; tasks: {self.spec.task_names()}") from None
        self.worker_id = cfg.worker_id
        self.core = WorkerCore(cfg.worker_id or "pending", task, cfg.models,
                               prefer_gpu=cfg.device == "auto", intra_op_threads=cfg.intra_op_threads,
                               max_queue=cfg.max_queue, plugins=self.spec.plugins,
                               prep_threads=cfg.prep_threads, linger_s=cfg.linger_s, burst=cfg.burst,
                               cudnn_conv_algo_search=cfg.cudnn_conv_algo_search,
                               batch_padding=cfg.batch_padding, model_memory_mb=cfg.model_memory_mb,
                               tasks=None if task else {t.name: t for t in self.spec.tasks})
        self.server = make_server()
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.address = ""
        self._tasks: list[asyncio.Task] = []
        self.subscriber: PlanSubscriber | None = None
        self.metrics_server: MetricsServer | None = None

    async def start(self) -> None:
        pb_grpc.add_WorkerServicer_to_server(WorkerServicer(self.core, self._newer_plan_seen), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = bind(self.server, self.cfg.host, self.cfg.port, tls=self.cfg.tls)
        self.address = self.cfg.advertise or f"{self.cfg.host}:{self.port}"
        if not self.worker_id:
            self.worker_id = f"{self.cfg.task or 'pool'}-{socket.gethostname()}-{self.port}"
        self.core.worker_id = self.worker_id
        self.metrics_server = serve_metrics(self.cfg.metrics_port, self.cfg.host, self.cfg.tls)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.core.start()
        log.info("worker_started", worker_id=self.worker_id, address=self.address, task=self.cfg.task or "(pool)",
                 tls=tls_mode(self.cfg.tls))
        self.subscriber = PlanSubscriber(self.cfg.redis_url, self.spec.name, self._on_plan,
                                         validate=lambda plan: validate_plan(plan, self.spec))
        self._tasks = [supervise("plan-subscriber", self.subscriber.run),
                       supervise("controller-loop", self._controller_loop),
                       supervise("model-release", self._release_loop)]
        if tuned():   # the heap keeps freed pages for the next request: give them back when idle
            self._tasks.append(supervise("heap-trim", IdleTrimmer(lambda: self.core.counters["arrivals"]).run))

    def _newer_plan_seen(self, version: int) -> None:
        if self.subscriber is not None:
            self.subscriber.poke()

    async def _on_plan(self, plan: Plan) -> None:
        mine = plan.workers.get(self.worker_id)
        if mine is None:
            # the plan does not need this worker: park (the model is freed after the linger),
            # loading the standby model the plan names for it, if any
            standby = plan.standby.get(self.worker_id)
            key = tuple(standby.split("/", 1)) if standby else None
            if await self.core.park(plan.version, standby=key, standby_batch=standby_batch(plan, key)):
                log.info("parked", worker_id=self.worker_id, plan_version=plan.version, standby=standby)
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            return
        try:
            await self.core.apply(mine.variant, mine.batch_size, plan.version,
                                  latency_ms=plan.latency_ms.get(mine.task, {}).get(mine.variant),
                                  task=mine.task)
        except Exception:
            log.exception("plan_not_applied", worker_id=self.worker_id, plan_version=plan.version,
                          task=mine.task, variant=mine.variant)
            return  # keep serving the previous variant
        burst = plan.burst.get(mine.task)
        # after the planned model is loaded: the burst model loads in the background
        self.core.set_burst(mine.task, burst, plan.latency_ms.get(mine.task, {}).get(burst) if burst else None)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def _release_loop(self) -> None:
        """Free models whose linger ended (after a move to another task, or parking)."""
        while True:
            await asyncio.sleep(min(0.5, max(0.05, self.cfg.linger_s / 4)))
            self.core.release_lingering()

    async def _controller_loop(self) -> None:
        """Register (idempotent), then heartbeat with statistics; re-register when the
        controller forgets us (restart). Never dies on controller errors."""
        channel = make_channel(self.cfg.controller, tls=self.cfg.tls)
        stub = pb_grpc.ControllerStub(channel)
        registered = False
        backoff = 0.2
        try:
            while True:
                try:
                    if not registered:
                        providers = self.core.host.providers if self.core.host else []
                        resp = await stub.RegisterWorker(pb.RegisterWorkerRequest(
                            worker_id=self.worker_id, address=self.address, task=self.cfg.task,
                            providers=providers, device=self.cfg.device), timeout=5)
                        registered = resp.accepted
                        if not resp.accepted:
                            log.error("registration_refused", worker_id=self.worker_id, reason=resp.message)
                            await asyncio.sleep(5)
                            continue
                        log.info("registered", worker_id=self.worker_id, controller=self.cfg.controller)
                    timings = self.core.take_timings()
                    try:
                        await stub.Heartbeat(pb.HeartbeatRequest(
                            stats=stats_to_proto(self.core.stats(), timings)), timeout=5)
                    except BaseException:
                        self.core.restore_timings(timings)   # the next heartbeat carries them
                        raise
                    backoff = 0.2
                    await asyncio.sleep(self.cfg.heartbeat_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        registered = False   # controller restarted and forgot us: register now
                        backoff = 0.2
                        continue
                    log.warning("controller_unreachable", error=exc.code().name, retry_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)   # a restarted controller is found within 2 s
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception:   # a bug here must not end heartbeats: log and go on
                    log.exception("heartbeat_failed", worker_id=self.worker_id, retry_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
        finally:
            await channel.close()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await stop_tasks(self._tasks)
        await self.server.stop(grace_s)   # lets in-flight InferBatch calls finish
        await self.core.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("worker_stopped", worker_id=self.worker_id)


def standby_batch(plan: Plan, standby: tuple[str, str] | None) -> int | None:
    """The batch size a standby model is warmed for: the largest the plan has latency
    figures for in its task (the profile's batch sizes for it). Warming more shapes costs
    a parked worker nothing it needs (it serves nothing), while each shape left cold costs
    the step that brings it back a cuDNN search on a GPU (on a CPU only batch 1 is warmed,
    whatever the size). None (the worker's last planned size) when the plan has none."""
    if standby is None:
        return None
    sizes = [b for figures in plan.latency_ms.get(standby[0], {}).values() for b in figures]
    return max(sizes) if sizes else None


async def serve(cfg: WorkerConfig) -> None:
    await check_credentials(cfg.redis_url)   # wrong Redis password: exit at once, not retry forever
    app = WorkerApp(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    configure_logging("worker", json_logs=cfg.json_logs)
    try:
        tune_malloc()   # before the first large message (a wrong setting: exit 2); services/common/memory.py
        run_service(serve(cfg))
    except MallocTuningError as exc:
        log.error("invalid_environment", error=str(exc))
        return 2
    except EventLoopError as exc:
        log.error("event_loop_unavailable", error=str(exc))
        return 2
    except SpecError as exc:
        log.error("invalid_input_file", error=str(exc))
        return 2
    except RedisAuthError as exc:
        log.error("redis_auth_failed", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
