"""``pipeserve-router``: one router per pipeline stage; the first stage's router is the
Open Inference Protocol v2 front door."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from services.policy.admission import TokenBucket
from services.policy.demand import DemandReporter
from services.common.errors import SpecError
from services.common.grpc_utils import (TlsConfig, add_tls_arguments, bind, make_server, tls_from_args,
                                        tls_mode)
from services.common.logging import configure_logging, get_logger
from services.common.metrics import MetricsServer, add_metrics_argument, serve_metrics
from services.common.plan import Plan, validate_plan
from services.common.plan_channel import PlanSubscriber, RedisOutage, connect, frontdoor_key
from services.common.redis_auth import RedisAuthError, check_credentials
from services.common.spec import load_spec
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.common.eventloop import EventLoopError, run_service
from services.common.memory import IdleTrimmer, MallocTuningError, tune_malloc, tuned
from services.common.tasks import raise_if_cancel_requested, stop_tasks, supervise
from services.router.clients import ChildRouterClient, InlineChildClient, WorkerClient
from services.router.core import RouterCore
from services.router.frontdoor_plane import FrontDoorPlane
from services.router.servicer import (FrontDoorServicer, RouterServicer, add_front_door_to_server,
                                      receive_limit_bytes)

log = get_logger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    spec: Path
    task: str
    host: str
    port: int
    redis_url: str
    children: dict[str, str]
    reserve_ms: float | None
    json_logs: bool
    tls: TlsConfig | None = None   # its server (front door included) and its channels
    max_inflight_mib: float | None = None   # front door: bytes of requests in flight (None: 3 x max_bytes)
    bdp_probe: bool = False                 # front door: HTTP/2 bandwidth-delay probing (window growth)
    answer_margin_ms: float | None = None   # front door: answer this long before a deadline (None: 50 ms)
    metrics_port: int | None = None   # Prometheus /metrics (None: off)
    inline_children: bool = False   # child stages without a --child address run in this process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-router",
        description="Route one pipeline stage: pick a worker of the stage by the plan's routing "
                    "weights, forward the stage's queries, fan region outputs out to the child "
                    "stages' routers, gather and answer. The root stage's router also serves the "
                    "Open Inference Protocol v2 (KServe/Triton gRPC) front door, model name = "
                    "pipeline name.")
    p.add_argument("--spec", required=True, help="pipeline spec file (e.g. pipelines/ocr.yaml)")
    p.add_argument("--task", required=True, help="the stage this router serves (e.g. det)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind, 0 = any free port")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="URL of the Redis holding the plan, e.g. redis://:PASSWORD@host:6379/0 or "
                        "rediss://... for TLS (default $REDIS_URL, better for a URL with a "
                        "password: command lines are visible to local users)")
    p.add_argument("--child", action="append", default=[], metavar="TASK=HOST:PORT",
                   help="address of a child stage's router; once per child task")
    p.add_argument("--inline-children", action="store_true",
                   help="route the child stages that have no --child address in this process too "
                        "(the whole subtree, one process, no gRPC hop between the stages; each "
                        "stage keeps its own routing, metrics and early dropping)")
    p.add_argument("--downstream-reserve-ms", type=float, default=None,
                   help="time the later stages need, used by workers to drop early (default: the "
                        "plan's latency figures, else the fastest recent successful child round trip)")
    p.add_argument("--max-inflight-mib", type=float, default=None,
                   help="front door: requests read and not answered yet may hold at most this many "
                        "MiB; beyond it new ones are shed with RESOURCE_EXHAUSTED before their body "
                        "is read (default: 4 x the spec's input.max_bytes, 32 MiB for the OCR spec)")
    p.add_argument("--answer-margin-ms", type=float, default=None,
                   help="front door: a request it cannot finish is answered DEADLINE_EXCEEDED this "
                        "long before its deadline (and the pipeline works to that earlier deadline), so "
                        "that the answer reaches the client before the client's own deadline fires "
                        "(default 50)")
    p.add_argument("--http2-bdp-probe", choices=("on", "off"), default="off",
                   help="front door: gRPC's HTTP/2 bandwidth-delay probing, which grows the flow-control "
                        "windows so that one upload uses a long, fast link fully, and with them what "
                        "the transport buffers for requests not read yet. Off (the default) keeps "
                        "gRPC's 64 KB windows: a burst of large requests costs less memory, and an "
                        "upload over a link with a long round trip is slower (about 64 KB per round "
                        "trip and stream). Routers of later stages always probe")
    p.add_argument("--log-json", action="store_true", default=os.environ.get("PIPESERVE_LOG_JSON") == "1",
                   help="log JSON lines instead of key=value")
    add_metrics_argument(p)
    add_tls_arguments(p)
    return p


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.redis_url:
        p.error("--redis-url (or REDIS_URL) is required")
    children = {}
    for item in a.child:
        task, sep, addr = item.partition("=")
        if not sep or not task or not addr:
            p.error(f"--child expects TASK=HOST:PORT, got {item!r}")
        children[task] = addr
    if a.answer_margin_ms is not None and a.answer_margin_ms < 0:
        p.error(f"--answer-margin-ms must be >= 0, got {a.answer_margin_ms:g}")
    tls = tls_from_args(a, p)
    return RouterConfig(spec=Path(a.spec), task=a.task, host=a.host, port=a.port, redis_url=a.redis_url,
                        children=children, reserve_ms=a.downstream_reserve_ms, json_logs=a.log_json,
                        tls=tls, max_inflight_mib=a.max_inflight_mib, bdp_probe=a.http2_bdp_probe == "on",
                        answer_margin_ms=a.answer_margin_ms,
                        metrics_port=a.metrics_port,
                        inline_children=a.inline_children)


class RouterApp:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.spec = load_spec(cfg.spec)
        try:
            task = self.spec.task(cfg.task)
        except KeyError as exc:
            raise SystemExit(f"error: {exc.args[0]}; tasks: {self.spec.task_names()}") from None
        # the tasks this process routes: its own, and with --inline-children every stage
        # below it that no --child address sends elsewhere
        hosted, todo = [task.name], list(task.children)
        while todo and cfg.inline_children:
            child = todo.pop(0)
            if child not in cfg.children:
                hosted.append(child)
                todo.extend(self.spec.task(child).children)
        missing = sorted({c for t in hosted for c in self.spec.task(t).children}
                         - set(hosted) - set(cfg.children))
        if missing:
            raise SystemExit(f"error: task {task.name!r} has child tasks {missing} without --child "
                             "addresses (give them, or --inline-children to route them in this process)")
        self.workers = WorkerClient(tls=cfg.tls)
        remote = ChildRouterClient(cfg.children, tls=cfg.tls)
        self.child_client = InlineChildClient({}, remote) if len(hosted) > 1 else remote
        self.cores = {t: RouterCore(self.spec, t, self.workers, self.child_client,
                                    reserve_ms=cfg.reserve_ms if t == task.name else None,
                                    on_newer_plan=self._newer_plan_seen) for t in hosted}
        self.core = self.cores[task.name]
        if isinstance(self.child_client, InlineChildClient):
            self.child_client.local.update({t: c for t, c in self.cores.items() if t != task.name})
        self.subscriber: PlanSubscriber | None = None
        self.is_root = self.spec.root.name == cfg.task
        self.admission = TokenBucket(None)
        self.front_door: FrontDoorPlane | None = None
        # the front door takes messages up to twice the spec's max_bytes (gRPC refuses larger)
        self.server = make_server(receive_limit_bytes(self.spec) if self.is_root else None,
                                  bdp_probe=cfg.bdp_probe or not self.is_root)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self.metrics_server: MetricsServer | None = None

    async def _on_plan(self, plan: Plan) -> None:
        for core in self.cores.values():
            core.set_plan(plan)
        if self.is_root:
            self.admission.set_rate(plan.admission_rate_qps)
        await self.workers.retain({w.address for t in self.cores for w in plan.workers_of(t)})
        status = (health_pb2.HealthCheckResponse.SERVING if all(c.ready() for c in self.cores.values())
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)

    async def start(self) -> None:
        pb_grpc.add_RouterServicer_to_server(RouterServicer(self.core), self.server)
        if self.is_root:
            self.front_door = FrontDoorPlane(
                self.core, self.admission,
                max_inflight_bytes=None if self.cfg.max_inflight_mib is None
                else int(self.cfg.max_inflight_mib * 2**20),
                **({} if self.cfg.answer_margin_ms is None else {"answer_margin_ms": self.cfg.answer_margin_ms}))
            # ModelInfer: shed before reading
            add_front_door_to_server(FrontDoorServicer(self.front_door), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = bind(self.server, self.cfg.host, self.cfg.port, tls=self.cfg.tls)
        await self.server.start()
        self.metrics_server = serve_metrics(self.cfg.metrics_port, self.cfg.host, self.cfg.tls)
        log.info("router_started", task=self.cfg.task, address=f"{self.cfg.host}:{self.port}",
                 front_door=self.is_root, children=self.cfg.children, inline=[t for t in self.cores if t != self.cfg.task] or None,
                 tls=tls_mode(self.cfg.tls))
        self.subscriber = PlanSubscriber(self.cfg.redis_url, self.spec.name, self._on_plan,
                                         validate=lambda plan: validate_plan(plan, self.spec),
                                         who=f"router:{self.cfg.task}")
        self._tasks.append(supervise("plan-subscriber", self.subscriber.run))
        if tuned():   # the heap keeps freed pages for the next request: give them back when idle
            self._tasks.append(supervise("heap-trim", IdleTrimmer(self._activity).run))
        if self.front_door is not None:
            self._tasks.append(supervise("demand-reporter", self._report_demand))

    def _activity(self) -> int:
        """Work taken in so far: results routed by every stage here, and the front door's
        request counters (also requests refused before routing)."""
        n = sum(sum(core.metrics.outcomes.values()) for core in self.cores.values())
        return n + (sum(self.front_door.counts.values()) if self.front_door is not None else 0)

    def _newer_plan_seen(self) -> None:
        if self.subscriber is not None:
            self.subscriber.poke()

    async def _report_demand(self, period_s: float = 1.0, check_s: float = 0.1) -> None:
        """Publish the front door's cumulative request counters: ``received`` for the
        controller's demand estimate, the outcomes (ok, dropped, shed, ...) for its status
        (``pipeserve status``). Once a ``period_s``, and early (checked every ``check_s``)
        when the requests since the last report are implausibly many for the recent rate
        (``report_due``: a step up reaches the controller within a fraction of a second).
        Redis outages are logged once (``redis_unreachable``, ``redis_recovered``) and never
        stop serving."""
        key = frontdoor_key(self.spec.name, f"{socket.gethostname()}:{self.port}")
        client = connect(self.cfg.redis_url)
        outage = RedisOutage("front-door", self.spec.name)
        reporter = DemandReporter(period_s)
        try:
            while True:
                if reporter.due(time.monotonic(), int(self.front_door.counts.get("received", 0))):
                    try:
                        await client.hset(key, mapping={**self.front_door.counts, "ts": time.time()})
                        await client.expire(key, 10)
                        raise_if_cancel_requested()   # a stop redis-py's wait may have swallowed
                        outage.succeeded()
                    except (RedisError, OSError) as exc:
                        outage.failed(exc)     # logs redis_unreachable once per outage
                await asyncio.sleep(check_s)
        finally:
            await client.aclose()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop within ``grace_s`` plus at most 3 s: background loops get 2 s
        (:func:`stop_tasks`), in-flight requests ``grace_s`` to be answered (then they are
        cancelled); once the server has stopped no call of ours is in flight, so the
        outgoing channels close at once (0.5 s grace). Each phase's time is logged."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        log.info("router_stopping", task=self.cfg.task)
        await self.health.enter_graceful_shutdown()
        await stop_tasks(self._tasks)
        t1 = loop.time()
        await self.server.stop(grace_s)
        t2 = loop.time()
        await self.workers.close(grace_s=0.5)
        await self.child_client.close(grace_s=0.5)
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("router_stopped", task=self.cfg.task, tasks_s=round(t1 - t0, 3),
                 server_s=round(t2 - t1, 3), channels_s=round(loop.time() - t2, 3))


async def serve(cfg: RouterConfig) -> None:
    await check_credentials(cfg.redis_url)   # wrong Redis password: exit at once, not retry forever
    app = RouterApp(cfg)
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
    configure_logging(f"router-{cfg.task}", json_logs=cfg.json_logs)
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
