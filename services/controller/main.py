"""``pipeserve-controller``: registers workers and publishes versioned plans via Redis."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from services.common.errors import InvalidInput, NotFound, SpecError, Unavailable
from services.common.grpc_utils import (TlsConfig, add_tls_arguments, bind, make_server, map_errors,
                                        tls_from_args, tls_mode)
from services.common.logging import configure_logging, get_logger
from services.common.metrics import add_metrics_argument, serve_metrics
from services.common.plan_channel import PlanPublisher, connect, frontdoor_pattern
from services.common.redis_auth import RedisAuthError, check_credentials, redact_url
from services.common.redis_server import RedisServer
from services.common.spec import load_spec
from services.common.eventloop import EventLoopError, run_service
from services.controller.core import ControllerCore
from services.controller.scaler import (DeploymentScaler, KubeScaleApi, ScalePolicy, ScalerUnavailable,
                                        split_pool)
from services.controller.status import OutcomeWindow, cluster_status, observe_outcomes
from services.policy.demand import DemandEstimator
from services.planner.sharing import workers_per_device_from_env
from services.policy.planning import CONTROLLER_SETTLING, PlannerPolicy, off_peak_headroom
from services.controller.registry import WorkerRegistry
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc

log = get_logger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    spec: Path
    plan_file: Path | None
    profile: Path | None
    planner: str
    headroom: float
    min_demand_qps: float
    demand_tau_s: float
    demand_tau_up_s: float
    host: str
    port: int
    redis_url: str | None
    reconcile_s: float
    heartbeat_timeout_s: float
    json_logs: bool
    adopt_grace_s: float = 10.0
    cooldown_s: float = 15.0
    online_calibration: bool = True
    burst: bool = True   # planner: name each task's burst variant (Plan.burst)
    standby: bool = True   # planner: name each parked worker's standby model (Plan.standby)
    # planner, with a sharing table in the profile: most workers on one device
    # (PIPESERVE_WORKERS_PER_GPU; None: every worker shares one, a single host)
    workers_per_device: int | None = None
    status_s: float = 10.0
    tls: TlsConfig | None = None   # its server
    metrics_port: int | None = None   # Prometheus /metrics (None: off)
    k8s_deployment: str | None = None   # scale this worker Deployment (None: off)
    k8s_namespace: str | None = None    # its namespace (None: the controller pod's)
    hardware_only: bool = False         # planner: full accuracy only (scale replicas, never variants)
    min_dwell_s: float = CONTROLLER_SETTLING["min_dwell_s"]            # planner: a plan stays this long but for rises beyond its capacity
    peak_hold_s: float = CONTROLLER_SETTLING["peak_hold_s"]           # planner: plan for at least the highest estimate of this long
    headroom_low: float | None = CONTROLLER_SETTLING["headroom_low"]   # planner: off-peak headroom (None: --headroom throughout)
    calibration_dwell_s: float = CONTROLLER_SETTLING["calibration_dwell_s"]   # planner: a re-plan for calibration drift alone waits this long
    k8s_policy: ScalePolicy | None = None


def full_accuracy_floor(profile, slo_ms: float) -> float:
    """The best expected accuracy the profile reaches within the SLO (a plan for no
    demand), less a hair for rounding: the planner's floor for hardware scaling only."""
    from services.planner.solver import PlannerContext, solve

    probe = solve(PlannerContext(profile, 0.0, max(len(profile.tasks), 1), slo_ms=slo_ms))
    return probe.max_accuracy * (1 - 1e-6)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-controller",
        description="Register workers, build the plan (which worker runs which variant at which "
                    "batch size, and the routing weights) and publish it as a versioned value "
                    "through Redis (a key plus a pub/sub notification). With --profile the CVXPY "
                    "planner decides from the demand the front doors report (hardware scaling "
                    "at full accuracy while it fits, accuracy scaling beyond, shedding under "
                    "overload); with --plan-file an operator file decides, reloaded when it changes.")
    p.add_argument("--spec", required=True, help="pipeline spec file (e.g. pipelines/ocr.yaml)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan-file", default=None, help="operator plan file (YAML/JSON allocations)")
    src.add_argument("--profile", default=None,
                     help="profile of the pipeline's variants (e.g. profiles/ocr_cpu.json): plan with the planner")
    p.add_argument("--planner", choices=["relaxed", "exact"], default="relaxed",
                   help="relaxed LP with rounding and repair (fast, default) or the exact MILP")
    p.add_argument("--headroom", type=float, default=2.0,
                   help="plan for this multiple of the estimated demand (default 2.0; see docs/results)")
    p.add_argument("--online-calibration", choices=("on", "off"), default="on",
                   help="planner: correct the profile with the batch times workers report and "
                        "re-plan when they drift past 30 %% (default on; off: plan on the profile "
                        "as it is)")
    p.add_argument("--burst", choices=("on", "off"), default="on",
                   help="planner: name each task's burst variant in the plan (its cheapest "
                        "capacity), which workers keep loaded beside the planned one and run a "
                        "batch on when their queue says the plan is overrun (default on)")
    p.add_argument("--standby", choices=("on", "off"), default="on",
                   help="planner: name, for each worker the plan parks, the model it would run at the "
                        "pool's full capacity (Plan.standby); the parked worker loads it and keeps it "
                        "ready, so the step up that brings it back costs no model load (default on)")
    p.add_argument("--cooldown-s", type=float, default=15.0,
                   help="planner: re-plan for lower demand (fewer workers: the rest park) only when "
                        "the current plan is at least this old (default 15 s; higher demand "
                        "re-plans at once)")
    p.add_argument("--min-dwell-s", type=float, default=CONTROLLER_SETTLING["min_dwell_s"],
                   help="planner: keep a plan at least this long (s) unless the workers changed or the "
                        "demand estimate rose beyond the plan's capacity, which re-plan at once (default 5)")
    p.add_argument("--peak-hold-s", type=float, default=CONTROLLER_SETTLING["peak_hold_s"],
                   help="planner: plan for at least the highest demand estimate of the last this many "
                        "seconds, so the plan does not drift back between the peaks of a periodic load "
                        "(default 30; 0: the estimate alone)")
    p.add_argument("--calibration-dwell-s", type=float, default=CONTROLLER_SETTLING["calibration_dwell_s"],
                   help="planner: re-plan for calibration drift alone only when the plan is at least "
                        "this old (default 15 s; a busy host's measured speed moves every few seconds)")
    p.add_argument("--headroom-low", type=float, default=CONTROLLER_SETTLING["headroom_low"],
                   help="planner: the headroom off-peak (below a quarter of the workers' full-accuracy "
                        "capacity; rising linearly to --headroom at half of it), so low demand uses "
                        "fewer workers and the rest park; burst variants absorb a step meanwhile "
                        "(default 1.25; 0: --headroom throughout)")
    p.add_argument("--min-demand-qps", type=float, default=0.5,
                   help="plan for at least this demand, e.g. at a cold start (default 0.5)")
    p.add_argument("--hardware-only", action="store_true",
                   help="planner: hardware scaling only, a floor at the best accuracy the profile "
                        "reaches within the SLO (more replicas of the most accurate variants, "
                        "never cheaper ones; beyond their capacity the plan sheds). The baseline "
                        "of docs/evaluation.md")
    p.add_argument("--demand-tau-s", type=float, default=3.0,
                   help="time constant of the demand estimate's moving average, over 5 s "
                        "windowed rates, while demand falls (default 3 s)")
    p.add_argument("--demand-tau-up-s", type=float, default=1.0,
                   help="the same while demand rises (default 1 s: too little capacity costs SLO "
                        "misses at once, too much only accuracy or workers)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="port to bind, 0 = any free port")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="Redis URL, e.g. redis://:PASSWORD@host:6379/0 or rediss://... for TLS "
                        "(default $REDIS_URL, better for a URL with a password: command lines are "
                        "visible to local users; if unset, an embedded redis-server is started on "
                        "a free port and its URL logged)")
    p.add_argument("--reconcile-s", type=float, default=0.25,
                   help="reconcile loop period (s; default 0.25: a demand report reaches a plan within it)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=5.0,
                   help="a worker silent this long leaves the plan")
    p.add_argument("--adopt-grace-s", type=float, default=10.0,
                   help="on a restart with a plan in Redis: keep that plan until its workers have "
                        "registered again, for at most this long (default 10 s)")
    p.add_argument("--status-s", type=float, default=10.0,
                   help="log a cluster_status line (workers, queues, drops, demand, calibration) "
                        "this often; 0 = never (default 10 s)")
    p.add_argument("--log-json", action="store_true", default=os.environ.get("PIPESERVE_LOG_JSON") == "1",
                   help="log JSON lines instead of key=value")
    add_metrics_argument(p)
    k8s = p.add_argument_group("Kubernetes scaling (docs/kubernetes.md; needs the k8s extra)")
    k8s.add_argument("--k8s-scale-deployment", default=None, metavar="NAME",
                     help="scale this Deployment of pool workers to the pool workers the plan uses "
                          "plus --k8s-spare, so parked capacity goes back to the cluster (default: off)")
    k8s.add_argument("--k8s-namespace", default=None, metavar="NS",
                     help="namespace of that Deployment (default: the controller pod's own)")
    k8s.add_argument("--k8s-spare", type=int, default=1, metavar="N",
                     help="idle pool workers kept beyond those in use (default 1)")
    k8s.add_argument("--k8s-min", type=int, default=1, metavar="N", help="fewest replicas (default 1)")
    k8s.add_argument("--k8s-max", type=int, default=8, metavar="N", help="most replicas (default 8)")
    k8s.add_argument("--k8s-down-cooldown-s", type=float, default=120.0, metavar="S",
                     help="scale down only after the target stayed lower this long (default 120 s)")
    add_tls_arguments(p)
    return p


def parse_config(argv: list[str] | None = None) -> ControllerConfig:
    p = build_parser()
    a = p.parse_args(argv)
    tls = tls_from_args(a, p)
    try:
        k8s_policy = ScalePolicy(spare=a.k8s_spare, min_replicas=a.k8s_min, max_replicas=a.k8s_max,
                                 down_cooldown_s=a.k8s_down_cooldown_s)
    except ValueError as exc:
        p.error(f"--k8s-*: {exc}")
    try:
        per_device = workers_per_device_from_env(os.environ)
    except ValueError as exc:
        p.error(str(exc))
    return ControllerConfig(spec=Path(a.spec), plan_file=Path(a.plan_file) if a.plan_file else None,
                            profile=Path(a.profile) if a.profile else None, planner=a.planner,
                            headroom=a.headroom, min_demand_qps=a.min_demand_qps, demand_tau_s=a.demand_tau_s,
                            demand_tau_up_s=a.demand_tau_up_s, cooldown_s=a.cooldown_s,
                            online_calibration=a.online_calibration == "on", burst=a.burst == "on",
                            standby=a.standby == "on", host=a.host, port=a.port, redis_url=a.redis_url, reconcile_s=a.reconcile_s,
                            heartbeat_timeout_s=a.heartbeat_timeout_s, json_logs=a.log_json, tls=tls,
                            adopt_grace_s=a.adopt_grace_s, status_s=a.status_s, metrics_port=a.metrics_port,
                            k8s_deployment=a.k8s_scale_deployment, k8s_namespace=a.k8s_namespace,
                            k8s_policy=k8s_policy if a.k8s_scale_deployment else None,
                            hardware_only=a.hardware_only, min_dwell_s=a.min_dwell_s, peak_hold_s=a.peak_hold_s,
                            headroom_low=a.headroom_low or None, calibration_dwell_s=a.calibration_dwell_s,
                            workers_per_device=per_device)


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, core: ControllerCore, outcomes: OutcomeWindow | None = None) -> None:
        self.core = core
        self.outcomes = outcomes if outcomes is not None else OutcomeWindow()

    @map_errors
    async def RegisterWorker(self, request, context):
        if not request.worker_id or not request.address:
            raise InvalidInput("worker_id and address are required")
        try:
            if request.task:   # empty: a pool worker
                self.core.spec.task(request.task)
        except KeyError:
            return pb.RegisterWorkerResponse(accepted=False,
                                             message=f"unknown task {request.task!r}; tasks: "
                                                     f"{self.core.spec.task_names()}")
        if self.core.registry.register(request.worker_id, request.address, request.task,
                                       list(request.providers)):
            log.info("worker_registered", worker_id=request.worker_id, address=request.address,
                     task=request.task or "(pool)")
            self.core.dirty = True
        return pb.RegisterWorkerResponse(accepted=True, plan_version=self.core.current.version
                                         if self.core.current else 0)

    @map_errors
    async def Heartbeat(self, request, context):
        stats = {f.name: getattr(request.stats, f.name) for f in request.stats.DESCRIPTOR.fields
                 if f.name not in ("providers", "timings")}
        stats["providers"] = list(request.stats.providers)
        stats["timings"] = [{"task": t.task, "variant": t.variant, "batch_size": t.batch_size, "count": t.count,
                             "total_ms": t.total_ms, "items": t.items, "regions": t.regions,
                             "max_ms": t.max_ms}
                            for t in request.stats.timings]
        if not self.core.registry.heartbeat(request.stats.worker_id, stats):
            raise NotFound(f"worker {request.stats.worker_id!r} is not registered")
        self.core.metrics.heartbeat()
        rec = self.core.registry.records[request.stats.worker_id]
        self.core.observe_stats(rec.worker.task or request.stats.task, stats)
        return pb.HeartbeatResponse(plan_version=self.core.current.version if self.core.current else 0)

    @map_errors
    async def GetPlan(self, request, context):
        if self.core.current is None:
            raise Unavailable("no plan published yet")
        return pb.GetPlanResponse(plan_json=self.core.current.to_json())

    @map_errors
    async def SetPlan(self, request, context):
        try:
            result = await self.core.set_operator_plan(request.plan_file_json)
        except SpecError as exc:
            raise InvalidInput(str(exc)) from None
        plan = result.published or self.core.current
        return pb.SetPlanResponse(plan_version=plan.version if plan else 0)

    @map_errors
    async def ClusterStatus(self, request, context):
        if request.window_s < 0:
            raise InvalidInput("window_s must be >= 0")
        status = cluster_status(self.core, self.outcomes, window_s=request.window_s or 60.0)
        return pb.ClusterStatusResponse(status_json=json.dumps(status, sort_keys=True))


async def read_demand(client, pipeline: str, estimator: DemandEstimator) -> None:
    """Feed every front door's request counter into the estimator."""
    async for key in client.scan_iter(match=frontdoor_pattern(pipeline), count=100):
        fields = await client.hgetall(key)
        if b"received" in fields and b"ts" in fields:
            estimator.observe(key.decode(), float(fields[b"received"]), float(fields[b"ts"]))


async def serve(cfg: ControllerConfig, ready: asyncio.Event | None = None) -> None:
    spec = load_spec(cfg.spec)
    scaler = None   # before anything is started: no client or credentials = exit at once
    if cfg.k8s_deployment:
        scaler = DeploymentScaler(KubeScaleApi(cfg.k8s_deployment, cfg.k8s_namespace), cfg.k8s_policy)
        log.info("worker_scaling_on", deployment=cfg.k8s_deployment, namespace=scaler.api.namespace,
                 spare=cfg.k8s_policy.spare, min=cfg.k8s_policy.min_replicas, max=cfg.k8s_policy.max_replicas)
    embedded = None
    redis_url = cfg.redis_url
    if not redis_url:
        embedded = RedisServer().start()
        redis_url = embedded.url
        log.info("embedded_redis_started", redis_url=redact_url(redis_url), binary=embedded.binary)
    else:
        await check_credentials(redis_url)   # wrong Redis password: exit at once, not retry forever
    client = connect(redis_url)
    publisher = PlanPublisher(client, spec.name)
    existing = None
    try:
        existing = await publisher.current()
        if existing is not None:
            publisher.last_version = existing.version
    except Exception as exc:
        log.warning("redis_unreachable_at_start", error=str(exc))
    planner = None
    if cfg.profile is not None:
        planner = PlannerPolicy.from_file(cfg.profile, spec.slo_ms, method=cfg.planner,
                                          headroom=cfg.headroom, min_demand_qps=cfg.min_demand_qps,
                                          cooldown_s=cfg.cooldown_s, calibrate=cfg.online_calibration,
                                          burst=cfg.burst, standby=cfg.standby, min_dwell_s=cfg.min_dwell_s,
                                          workers_per_device=cfg.workers_per_device,
                                          peak_hold_s=cfg.peak_hold_s, calibration_dwell_s=cfg.calibration_dwell_s,
                                          headroom_low=off_peak_headroom(cfg.headroom_low, cfg.burst, cfg.hardware_only))
        if cfg.hardware_only:
            planner.min_accuracy = full_accuracy_floor(planner.profile, spec.slo_ms)
            log.info("hardware_only", min_accuracy=round(planner.min_accuracy, 6))
        if planner.profile.name != spec.name:
            raise SpecError(str(cfg.profile), "name", f"profile is for {planner.profile.name!r}, spec is {spec.name!r}")
    core = ControllerCore(spec, WorkerRegistry(cfg.heartbeat_timeout_s), publisher.publish, cfg.plan_file,
                          planner=planner)
    if planner is not None:
        log.info("profile_loaded", path=str(cfg.profile), device=planner.profile.device,
                 provenance=planner.profile.provenance[:200])
    if existing is not None and existing.pipeline == spec.name:
        core.adopt(existing, cfg.adopt_grace_s)   # a restart: continue from the plan in force
    demand = DemandEstimator(tau_s=cfg.demand_tau_s, tau_up_s=cfg.demand_tau_up_s)
    server = make_server()
    outcomes = OutcomeWindow()   # recent drops and failures, for ClusterStatus
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(core, outcomes), server)
    health_servicer = health.aio.HealthServicer()   # Kubernetes' gRPC probes (deploy/k8s)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, cfg.host, cfg.port, tls=cfg.tls)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    metrics_server = serve_metrics(cfg.metrics_port, cfg.host, cfg.tls)
    log.info("controller_started", address=f"{cfg.host}:{port}", pipeline=spec.name,
             redis_url=redact_url(redis_url), tls=tls_mode(cfg.tls),
             plan_file=str(cfg.plan_file) if cfg.plan_file else None,
             profile=str(cfg.profile) if cfg.profile else None, planner=cfg.planner if planner else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    demand_failing = store_failing = False
    next_ensure = time.monotonic()
    next_status = time.monotonic() + cfg.status_s
    next_outcomes = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() >= next_outcomes:
                next_outcomes = time.monotonic() + 1.0
                try:   # the counters behind ClusterStatus's recent outcomes
                    await observe_outcomes(outcomes, client, spec.name, core.registry.records.values(),
                                           time.monotonic())
                except Exception as exc:   # Redis away: the other steps log it
                    log.debug("outcomes_read_failed", error=str(exc))
            if planner is not None:
                try:
                    await read_demand(client, spec.name, demand)
                    publisher.outage.succeeded()
                    core.demand_qps = demand.update(time.time())
                    core.demand_ready = demand.ready
                    if demand_failing:
                        log.info("demand_read_recovered")
                    demand_failing = False
                except Exception as exc:   # Redis away: plan on the last estimate
                    if isinstance(exc, (RedisError, OSError)):
                        publisher.outage.failed(exc)   # redis_unreachable, once per outage
                    if not demand_failing:
                        log.warning("demand_read_failed", error=str(exc))
                    demand_failing = True
            if core.current is not None and time.monotonic() >= next_ensure:
                next_ensure = time.monotonic() + 2.0
                try:   # Redis restarted empty: put the plan in force back for new subscribers
                    await publisher.ensure(core.current)
                    if store_failing:
                        log.info("plan_store_reachable")
                    store_failing = False
                except Exception as exc:
                    if not store_failing:
                        log.warning("plan_store_unreachable", error=str(exc))
                    store_failing = True
            result = await core.reconcile()
            if result.duration_ms > 200:
                log.warning("slow_reconcile", duration_ms=round(result.duration_ms, 1))
            if scaler is not None and core.current is not None and core.adopted is None:
                active, parked = split_pool(core.current.workers, core.registry.live())
                # the Kubernetes client blocks: off the event loop
                await asyncio.to_thread(scaler.step, active, time.monotonic(), parked)
            if cfg.status_s > 0 and time.monotonic() >= next_status:
                next_status = time.monotonic() + cfg.status_s
                log.info("cluster_status", **core.status())
            try:
                await asyncio.wait_for(stop.wait(), cfg.reconcile_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(2)
        if metrics_server is not None:
            metrics_server.close()
        await client.aclose()
        if embedded:
            embedded.stop()
        log.info("controller_stopped")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    configure_logging("controller", json_logs=cfg.json_logs)
    try:
        run_service(serve(cfg))
    except EventLoopError as exc:
        log.error("event_loop_unavailable", error=str(exc))
        return 2
    except SpecError as exc:
        log.error("invalid_input_file", error=str(exc))
        return 2
    except RedisAuthError as exc:
        log.error("redis_auth_failed", error=str(exc))
        return 2
    except ScalerUnavailable as exc:
        log.error("worker_scaling_unavailable", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
