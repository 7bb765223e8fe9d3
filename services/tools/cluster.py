"""Start the whole system on one machine as separate processes: Redis (embedded unless
``REDIS_URL`` is given), the controller, workers, and one router per stage, the root
router being the OIP front door. Used by ``pipeserve-demo`` and the integration tests.

Every process logs to ``<log_dir>/<name>.log``. ``stop()`` sends SIGTERM (graceful:
servers drain in-flight calls), then kills what is left after a grace period.

With ``ClusterConfig.tls`` every process serves and calls over TLS (mutual TLS with
``require_client_cert``), and so do the launcher's own readiness checks. The Redis URL
(which may carry a password) reaches the processes in their ``REDIS_URL`` environment,
not on their command lines.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.grpc_utils import TlsConfig, make_sync_channel
from services.common.redis_server import RedisServer, free_port
from services.common.spec import PipelineSpec, load_spec
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc


@dataclass
class ClusterConfig:
    spec: Path
    plan_file: Path | None = None   # operator plan file, or
    profile: Path | None = None     # the planner on this profile
    headroom: float | None = None   # planner: plan for this multiple of the demand estimate
    min_demand_qps: float | None = None   # planner: plan for at least this (the expected load)
    models: Path = Path("models")
    workers: dict[str, int] = field(default_factory=dict)   # task -> bound workers (default 1 each, 0 with a pool)
    pool: int = 0                          # pool workers (no --task: the plan moves and parks them)
    controller_args: tuple[str, ...] = ()  # extra controller flags (e.g. --cooldown-s 5)
    worker_args: tuple[str, ...] = ()      # extra flags for every worker (e.g. --linger-s 1)
    log_dir: Path = Path("runs/cluster")
    redis_url: str | None = None
    json_logs: bool = False
    heartbeat_timeout_s: float = 5.0
    tls: TlsConfig | None = None          # TLS (and mTLS) for every service and the checks
    redis_password: str | None = None     # the embedded Redis requires it (with redis_url unset)
    metrics: bool = False                 # every service serves /metrics on a free port
    controller_port: int | None = None    # fixed ports (``pipeserve up``); None: free ones
    front_door_port: int | None = None
    inline_routers: bool = False          # one router process for every stage (--inline-children)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    address: str = ""
    module: str = ""
    args: tuple[str, ...] = ()


class LocalCluster:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.spec: PipelineSpec = load_spec(cfg.spec)
        self.redis: RedisServer | None = None
        self.redis_url = cfg.redis_url or ""
        self.procs: dict[str, Proc] = {}
        self.controller_address = ""
        self.router_addresses: dict[str, str] = {}
        self.front_door = ""
        self.metrics_addresses: dict[str, str] = {}   # process name -> host:port of its /metrics

    # -- processes ---------------------------------------------------------------
    def _spawn(self, name: str, module: str, args: list[str], address: str = "") -> Proc:
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.cfg.log_dir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESERVE_TLS")}
        env.update(REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")   # the URL stays off argv
        if self.cfg.metrics and "--metrics-port" not in args:   # kept on a restart (same port)
            mport = free_port()
            args = [*args, "--metrics-port", str(mport)]
            self.metrics_addresses[name] = f"127.0.0.1:{mport}"
        given = tuple(args)
        if self.cfg.tls is not None:
            args = [*args, *self.cfg.tls.to_args()]
        if self.cfg.json_logs:
            env["PIPESERVE_LOG_JSON"] = "1"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(name, popen, log_path, address, module, given)
        self.procs[name] = proc
        return proc

    # -- faults (the fault-injection tests and docs/reliability.md use these) ------
    def kill(self, name: str) -> Proc:
        """SIGKILL one process (no graceful shutdown) and wait for it; it stays listed
        (dead) so :meth:`restart` can start it again with the same arguments and port."""
        p = self.procs[name]
        p.popen.kill()
        p.popen.wait()
        return p

    def restart(self, name: str) -> Proc:
        """Start a killed (or exited) process again: same module, arguments and port."""
        p = self.procs[name]
        if p.popen.poll() is None:
            raise RuntimeError(f"{name} is still running")
        with open(p.log_path, "ab") as log:
            log.write(b"\n--- restarted by the cluster launcher ---\n")
        return self._spawn(name, p.module, list(p.args), p.address)

    def kill_redis(self) -> None:
        """SIGKILL the embedded Redis (its data is gone: it keeps nothing on disk)."""
        if self.redis is None or self.redis.proc is None:
            raise RuntimeError("the cluster did not start its own Redis")
        self.redis.proc.kill()
        self.redis.proc.wait()

    def restart_redis(self) -> None:
        """Start the embedded Redis again on the same port, empty."""
        if self.redis is None:
            raise RuntimeError("the cluster did not start its own Redis")
        self.redis = RedisServer(port=self.redis.port, password=self.cfg.redis_password).start()

    def start_worker(self, task: str, index: int) -> Proc:
        """Start worker ``<task>-<index>``; ``task`` "" starts pool worker ``pool-<index>``."""
        port = free_port()
        wid = f"{task or 'pool'}-{index}"
        bind = ["--task", task] if task else []
        return self._spawn(f"worker-{wid}", "services.worker.main", [
            "--spec", str(self.cfg.spec), *bind, "--worker-id", wid, "--port", str(port),
            "--controller", self.controller_address,
            "--models", str(self.cfg.models), *self.cfg.worker_args], address=f"127.0.0.1:{port}")

    def start(self, ready_timeout_s: float = 120.0) -> "LocalCluster":
        """Start every process and wait until the cluster serves. A cluster that does not
        come up (a process exits, the wait times out, Ctrl-C) leaves no process behind."""
        try:
            return self._start(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, ready_timeout_s: float) -> "LocalCluster":
        if not self.redis_url:
            self.redis = RedisServer(password=self.cfg.redis_password).start()
            self.redis_url = self.redis.url
        cport = self.cfg.controller_port or free_port()
        self.controller_address = f"127.0.0.1:{cport}"
        if (self.cfg.plan_file is None) == (self.cfg.profile is None):
            raise ValueError("give exactly one of plan_file and profile")
        source = (["--plan-file", str(self.cfg.plan_file)] if self.cfg.plan_file is not None
                  else ["--profile", str(self.cfg.profile)])
        if self.cfg.profile is not None and self.cfg.headroom is not None:
            source += ["--headroom", str(self.cfg.headroom)]
        if self.cfg.profile is not None and self.cfg.min_demand_qps is not None:
            source += ["--min-demand-qps", str(self.cfg.min_demand_qps)]
        self._spawn("controller", "services.controller.main", [
            "--spec", str(self.cfg.spec), *source, "--port", str(cport),
            "--heartbeat-timeout-s", str(self.cfg.heartbeat_timeout_s), *self.cfg.controller_args],
            address=self.controller_address)
        # with inline routers, the root's process routes every stage (no child routers)
        routed = [self.spec.root] if self.cfg.inline_routers else list(self.spec.tasks)
        for t in routed:
            fixed = self.cfg.front_door_port if t.name == self.spec.root.name else None
            self.router_addresses[t.name] = f"127.0.0.1:{fixed or free_port()}"
        # children first, so a parent's first call finds its child listening
        for t in reversed(routed):
            args = ["--spec", str(self.cfg.spec), "--task", t.name, "--port",
                    self.router_addresses[t.name].rsplit(":", 1)[1]]
            if self.cfg.inline_routers:
                args.append("--inline-children")
            for c in t.children if not self.cfg.inline_routers else ():
                args += ["--child", f"{c}={self.router_addresses[c]}"]
            self._spawn(f"router-{t.name}", "services.router.main", args, address=self.router_addresses[t.name])
        for t in self.spec.tasks:
            for i in range(self.cfg.workers.get(t.name, 0 if self.cfg.pool else 1)):
                self.start_worker(t.name, i)
        for i in range(self.cfg.pool):
            self.start_worker("", i)
        self.front_door = self.router_addresses[self.spec.root.name]
        self.wait_ready(ready_timeout_s)
        return self

    def channel(self, address: str, options: list | None = None) -> grpc.Channel:
        """A blocking channel to one of the cluster's services, with the cluster's TLS
        (its certificate is the client certificate under mutual TLS)."""
        return make_sync_channel(address, self.cfg.tls, options=options)

    def check_alive(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is not None:
                tail = p.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}; log tail:\n{tail}")

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the front door says the pipeline model is ready, every worker this
        cluster started has registered with the controller, and every worker of the plan
        serves. (A plan can be served before the last worker registered: on a busy machine
        a slow worker would otherwise join the plan after ``start`` returned.)"""
        deadline = time.monotonic() + timeout_s
        with self.channel(self.front_door) as ch:
            stub = ipb_grpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if stub.ModelReady(ipb.ModelReadyRequest(name=self.spec.name), timeout=1).ready \
                            and not self.unregistered_workers() and self.all_workers_serving():
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        missing = self.unregistered_workers()
        raise TimeoutError(f"cluster not ready within {timeout_s}s"
                           + (f" (not registered with the controller: {sorted(missing)})" if missing else "")
                           + f"; logs in {self.cfg.log_dir}")

    def unregistered_workers(self) -> set[str]:
        """Worker ids this cluster started (and are running) that the controller does not
        list yet (all of them when it cannot be asked)."""
        import json

        from services.gen import pipeserve_pb2 as pb
        from services.gen import pipeserve_pb2_grpc as pb_grpc

        started = {p.name.removeprefix("worker-") for p in self.procs.values()
                   if p.name.startswith("worker-") and p.popen.poll() is None}
        if not started:
            return set()
        with self.channel(self.controller_address) as ch:
            try:
                raw = pb_grpc.ControllerStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=2).status_json
            except grpc.RpcError:
                return started
        return started - {w["worker_id"] for w in json.loads(raw).get("workers", [])}

    def wait_planned(self, count: int, timeout_s: float = 120.0) -> None:
        """Block until the controller's plan uses ``count`` workers and they serve (an
        operator plan's replicas are filled as workers register)."""
        deadline = time.monotonic() + timeout_s
        while len(self.planned_worker_ids() or ()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the plan did not take {count} workers within {timeout_s:g} s "
                                   f"(it has {sorted(self.planned_worker_ids() or ())}); logs in {self.cfg.log_dir}")
            self.check_alive()
            time.sleep(0.2)
        self.wait_ready(max(1.0, deadline - time.monotonic()))

    def planned_worker_ids(self) -> set[str] | None:
        """The workers the controller's current plan uses (None: no plan yet)."""
        import json

        from services.gen import pipeserve_pb2 as pb
        from services.gen import pipeserve_pb2_grpc as pb_grpc

        with self.channel(self.controller_address) as ch:
            try:
                raw = pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=1).plan_json
            except grpc.RpcError:
                return None
        return set(json.loads(raw)["workers"])

    def all_workers_serving(self) -> bool:
        """Every worker the plan uses serves (workers the plan leaves idle load nothing)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        planned = self.planned_worker_ids()
        if planned is None:
            return False
        for p in self.procs.values():
            if not p.name.startswith("worker-") or p.name.removeprefix("worker-") not in planned:
                continue
            with self.channel(p.address) as ch:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False
                if r.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
        return True

    def stop_proc(self, name: str, grace_s: float = 10.0) -> int | None:
        p = self.procs.pop(name)
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # what it was stuck on goes to its log before the kill (faulthandler)
                p.popen.send_signal(signal.SIGUSR1)
                try:
                    p.popen.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                if p.popen.poll() is None:
                    p.popen.kill()
                    p.popen.wait()
                    with open(p.log_path, "a") as log:
                        log.write(f"[cluster] {name} did not stop within {grace_s:g}s of SIGTERM; "
                                  "SIGKILLed (its stacks are above)\n")
        return p.popen.returncode

    def exit_report(self, codes: dict[str, int | None], tail_chars: int = 4000) -> str:
        """What a test says when ``codes`` (from :meth:`stop`) are not all 0: each unclean
        exit with the end of its log (for one killed on stop, the stacks it was stuck on)."""
        parts = [f"unclean exits: {codes}"]
        for name, code in codes.items():
            if code != 0:
                log_path = self.cfg.log_dir / f"{name}.log"
                tail = log_path.read_text(errors="replace")[-tail_chars:] if log_path.exists() else ""
                parts.append(f"--- {name} (exit {code}), end of {log_path}:\n{tail}")
        return "\n".join(parts)

    def stop(self) -> dict[str, int | None]:
        codes = {}
        # front door first so no new work enters; then the rest
        order = [f"router-{self.spec.root.name}"] + [n for n in list(self.procs) if n != f"router-{self.spec.root.name}"]
        for name in order:
            if name in self.procs:
                codes[name] = self.stop_proc(name)
        if self.redis is not None:
            self.redis.stop()
        return codes

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
