"""``pipeserve up``: the whole cluster on this machine, in the foreground, in one command.

Starts Redis (embedded, unless ``--redis-url``/``$REDIS_URL`` names one), the controller,
the workers (one per task unless ``--workers``; ``--pool N`` adds N pool workers, which the
plan gives whichever task needs them, and then no task gets a bound worker unless
``--workers`` asks) and one router per stage, the root one the OIP v2 front door on a fixed
port (8001), waits until every worker of the plan serves,
prints the addresses (front door, controller, ``REDIS_URL``) and stays up until Ctrl-C or
SIGTERM, then stops every process it started (gracefully: SIGTERM, drain, then kill).

A process that exits while the cluster runs ends the command with exit status 1 and the
tail of that process's log; a cluster that does not come up leaves no process behind.
Logs go to ``<log-dir>/<process>.log``.

Like the demo, it first fits the profile to this host (``pipeserve-calibrate``: a short
speed probe against the profile, cached per host in ``runs/profiles/``) and hands the
controller a calibrated copy when the profile does not match (``--calibrate off``: the
profile as it is). ``--min-demand-qps`` tells the planner the load to expect (the demo
passes the rate it is about to send), so that the first plan is made for it.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from services.common.grpc_utils import TlsError, add_tls_arguments, tls_from_args

DEFAULT_FRONT_DOOR_PORT = 8001
DEFAULT_CONTROLLER_PORT = 50050


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default="pipelines/ocr.yaml", help="pipeline spec (default %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default=None,
                     help="plan with the planner on this profile (default profiles/ocr_cpu.json for "
                          "the OCR spec)")
    src.add_argument("--plan-file", default=None, help="plan from this operator plan file instead")
    p.add_argument("--workers", action="append", default=[], metavar="TASK=N",
                   help="workers per task (default 1 each; 0 each with --pool), e.g. --workers rec=2")
    p.add_argument("--pool", type=int, default=0, metavar="N",
                   help="N pool workers (no task: the plan moves and parks them); then tasks get "
                        "bound workers only from --workers")
    # as services.tools.calibrate.add_calibration_arguments (not imported here: it loads the
    # planner, and `pipeserve status` builds this parser too)
    p.add_argument("--calibrate", choices=("auto", "off", "refresh"), default="auto",
                   help="auto: probe this host's speed against the profile once (cached per host) and "
                        "plan on a calibrated copy when it does not match; refresh: probe again; off: "
                        "plan on the profile as it is (default auto)")
    p.add_argument("--calibration-cache", default="runs/profiles",
                   help="where probe results and calibrated profiles are cached per host (default %(default)s)")
    p.add_argument("--pages", default="data/eval", help="pages the calibration probe uses (make data)")
    p.add_argument("--min-demand-qps", type=float, default=None, metavar="QPS",
                   help="the planner plans for at least this demand, e.g. the load you are about to "
                        "send (default: the controller's, 0.5: it follows the measured demand)")
    p.add_argument("--models", default="models", help="model directory (make models)")
    p.add_argument("--port", type=int, default=DEFAULT_FRONT_DOOR_PORT,
                   help="the front door's port (default %(default)s)")
    p.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                   help="the controller's port (default %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="use this Redis (default $REDIS_URL; unset: an embedded one on a free port)")
    p.add_argument("--log-dir", default=None, help="where process logs go (default runs/up-<time>)")
    p.add_argument("--inline-routers", action="store_true",
                   help="one router process routes every stage (the front door's; no gRPC hop "
                        "between stages' routers) instead of one router process per stage")
    p.add_argument("--ready-timeout", type=float, default=180.0, metavar="S",
                   help="give up when the cluster does not serve within S seconds (default 180)")
    add_tls_arguments(p)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind: a port with only closed connections (TIME_WAIT) is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def parse_workers(items: list[str], tasks: list[str], pool: int = 0) -> dict[str, int]:
    """Bound workers per task: 1 each by default, 0 each beside a pool."""
    workers = {t: 0 if pool else 1 for t in tasks}
    for item in items:
        task, _, n = item.partition("=")
        if task not in workers or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--workers expects TASK=N with a task of {tasks} and N >= 1, got {item!r}")
        workers[task] = int(n)
    return workers


def run(a: argparse.Namespace) -> int:
    from services.common.errors import SpecError
    from services.common.spec import load_spec
    from services.tools.cluster import ClusterConfig, LocalCluster

    def fail(msg: str) -> int:
        print(f"pipeserve up: error: {msg}", file=sys.stderr)
        return 2

    try:
        spec = load_spec(a.spec)
    except (SpecError, OSError) as exc:
        return fail(str(exc))
    if a.pool < 0:
        return fail(f"--pool must be >= 0, got {a.pool}")
    try:
        workers = parse_workers(a.workers, [t.name for t in spec.tasks], a.pool)
    except ValueError as exc:
        return fail(str(exc))
    profile = a.profile
    if a.plan_file is None and profile is None:
        if spec.name != "ocr":
            return fail(f"give --profile or --plan-file for pipeline {spec.name!r}")
        profile = "profiles/ocr_cpu.json"
    for path, hint in ((Path(a.models), "make models"), (Path(profile or a.plan_file), "")):
        if not path.exists():
            return fail(f"{path} does not exist" + (f"; run `{hint}` first" if hint else ""))
    if a.port == a.controller_port:
        return fail("--port and --controller-port must differ")
    for name, port in (("--port", a.port), ("--controller-port", a.controller_port)):
        if not 0 < port < 65536:
            return fail(f"{name} must be a port number, got {port}")
        if port_in_use(port):
            return fail(f"port {port} ({name}) is in use, by another cluster perhaps; "
                        f"stop it or choose another with {name}")
    try:
        tls = tls_from_args(a)
    except TlsError as exc:
        return fail(str(exc))
    log_dir = Path(a.log_dir or f"runs/up-{time.strftime('%Y%m%d-%H%M%S')}")
    if profile is not None and a.calibrate != "off":
        from services.tools.calibrate import profile_to_plan_on

        if not Path(a.pages).exists():
            return fail(f"{a.pages} does not exist (the calibration probe's pages); run `make data` first, "
                        f"or --calibrate off")
        profile = profile_to_plan_on(Path(a.spec), Path(profile), Path(a.models), Path(a.pages), a.calibrate,
                                     Path(a.calibration_cache), log=lambda m: print(m, flush=True))
    min_demand = a.min_demand_qps
    print(f"plans from: {'the operator plan ' + a.plan_file if a.plan_file else 'the planner on ' + str(profile)}"
          + (f", for at least {min_demand:.1f} req/s" if profile is not None and min_demand else ""), flush=True)
    cfg = ClusterConfig(spec=Path(a.spec), plan_file=Path(a.plan_file) if a.plan_file else None,
                        profile=Path(profile) if profile else None, models=Path(a.models), workers=workers,
                        pool=a.pool, min_demand_qps=min_demand if profile is not None else None,
                        log_dir=log_dir, redis_url=a.redis_url or None, tls=tls,
                        controller_port=a.controller_port, front_door_port=a.port,
                        inline_routers=a.inline_routers)
    cluster = LocalCluster(cfg)

    def interrupt(signum, _frame) -> None:   # SIGTERM as Ctrl-C: the same clean stop
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    kinds = [f"{n} {t}" for t, n in workers.items() if n] + ([f"{a.pool} pool"] if a.pool else [])
    print(f"starting {'' if a.redis_url else 'redis, '}the controller, {sum(workers.values()) + a.pool} workers "
          f"({', '.join(kinds)}) and "
          f"{'1 router (all stages)' if a.inline_routers else f'{len(spec.tasks)} routers'} "
          f"(logs: {log_dir}) ...", flush=True)
    t0 = time.monotonic()
    rc = 0
    codes: dict = {}
    try:
        try:
            cluster.start(ready_timeout_s=a.ready_timeout)   # stops what it started if it fails
        except KeyboardInterrupt:
            print("interrupted while starting; stopped", file=sys.stderr)
            return 130
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"pipeserve up: the cluster did not come up: {exc}", file=sys.stderr)
            return 1
        print(f"ready in {time.monotonic() - t0:.1f} s\n"
              f"  front door (OIP v2 gRPC)  {cluster.front_door}\n"
              f"  controller                {cluster.controller_address}\n"
              f"  REDIS_URL={cluster.redis_url}\n"
              f"Ctrl-C stops it. In another terminal: pipeserve status", flush=True)
        try:
            while True:
                time.sleep(0.5)
                cluster.check_alive()
        except KeyboardInterrupt:
            print("stopping ...", flush=True)
        except RuntimeError as exc:   # a process exited
            print(f"pipeserve up: {exc}", file=sys.stderr)
            rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the stop finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        codes = cluster.stop()   # nothing left after a failed start: it cleaned up itself
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bad = {k: v for k, v in codes.items() if v not in (0, None)}
    print(f"stopped {len(codes)} processes" + (f"; non-zero exits: {bad}" if bad else " cleanly"), flush=True)
    return rc
