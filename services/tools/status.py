"""``pipeserve status``: the live cluster at a glance.

Two sources, each optional, so that one being away still shows the other:

* the controller's ``ClusterStatus`` RPC (``--controller``, default 127.0.0.1:50050): the
  plan in force, every registered worker and its state, the demand estimate against the
  plan's capacity, the tasks still waiting for a worker, and what the front doors and the
  workers dropped, shed or failed over the recent window;
* Redis (``--redis-url``, default ``$REDIS_URL``; skipped when unset): the plan the data
  plane follows (its version should be the controller's) and every front door's counters.

Exit status: 0 when every source asked answered, 1 when one did not (what the others said
is still printed), 2 on bad arguments; with ``--wait`` 1 as well when the cluster did not
become ready in time. :func:`format_status` is pure: the text is a function of the dict
``--json`` prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import grpc

from services.common.grpc_utils import TlsConfig, TlsError, add_tls_arguments, make_sync_channel, tls_from_args

DEFAULT_CONTROLLER = "127.0.0.1:50050"
CLEAR = "\033[2J\033[H"


# -- gathering ---------------------------------------------------------------------------
def ask_controller(address: str, tls: TlsConfig | None, window_s: float, timeout_s: float) -> dict:
    from services.gen import pipeserve_pb2 as pb
    from services.gen import pipeserve_pb2_grpc as pb_grpc

    with make_sync_channel(address, tls) as ch:
        resp = pb_grpc.ControllerStub(ch).ClusterStatus(pb.ClusterStatusRequest(window_s=window_s),
                                                        timeout=timeout_s)
    return json.loads(resp.status_json)


def read_redis(url: str, pipeline: str, timeout_s: float) -> dict:
    """The stored plan (summarised) and the front doors' cumulative counters."""
    import redis

    from services.common.plan import Plan
    from services.common.plan_channel import frontdoor_pattern, plan_key
    from services.controller.status import FRONTDOOR_COUNTERS, plan_summary

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        raw = client.get(plan_key(pipeline))
        plan = None if raw is None else plan_summary(Plan.from_json(raw, source="redis"), time.time())
        prefix = frontdoor_pattern(pipeline)[:-1]
        doors = {}
        for key in client.scan_iter(match=frontdoor_pattern(pipeline), count=100):
            fields = client.hgetall(key)
            doors[key.decode()[len(prefix):]] = {k.decode(): int(float(v)) for k, v in fields.items()
                                                 if k.decode() in FRONTDOOR_COUNTERS}
        return {"plan": plan, "frontdoors": dict(sorted(doors.items()))}
    finally:
        client.close()


def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code().name if hasattr(exc, "code") and exc.code() else "ERROR"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code}: {details}"


def gather(controller: str, redis_url: str | None, pipeline: str | None, tls: TlsConfig | None,
           window_s: float = 60.0, timeout_s: float = 3.0) -> dict:
    """Ask both sources; a source that fails leaves its error in ``*_error``."""
    from services.common.redis_auth import redact_url

    out: dict[str, Any] = {"controller_address": controller, "controller": None, "controller_error": "",
                           "redis_url": redact_url(redis_url) if redis_url else None,
                           "redis": None, "redis_error": ""}
    try:
        out["controller"] = ask_controller(controller, tls, window_s, timeout_s)
    except grpc.RpcError as exc:
        out["controller_error"] = _rpc_error(exc)
    name = pipeline or (out["controller"] or {}).get("pipeline") or "ocr"
    out["pipeline"] = name
    if redis_url:
        try:
            out["redis"] = read_redis(redis_url, name, timeout_s)
        except Exception as exc:   # unreachable, refused, wrong password, a malformed plan
            out["redis_error"] = f"{type(exc).__name__}: {exc}"
    return out


def is_ready(status: dict) -> tuple[bool, str]:
    """Ready = the controller has a plan in force and every worker it names serves."""
    c = status.get("controller")
    if c is None:
        return False, f"controller not reachable ({status.get('controller_error')})"
    if c.get("plan") is None:
        return False, c.get("no_plan_reason") or "no plan yet"
    planned = {w for a in c["plan"]["allocations"] for w in a["workers"]}
    waiting = [f"{w['worker_id']} ({w['state']})" for w in c["workers"]
               if w["worker_id"] in planned and w["state"] != "serving"]
    if waiting:
        return False, "planned workers not serving yet: " + ", ".join(waiting)
    return True, ""


# -- formatting --------------------------------------------------------------------------
def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _plan_lines(plan: dict, where: str) -> list[str]:
    adm = plan.get("admission_rate_qps")
    promises = [f"capacity {plan['capacity_qps']:.1f} req/s" if plan.get("capacity_qps") is not None else "",
                f"expected accuracy {plan['expected_accuracy']:.4f}" if plan.get("expected_accuracy") is not None
                else "",
                "admission all" if adm is None else f"admission {adm:.1f} req/s"]
    lines = [f"plan v{plan['version']} ({plan['source']}, {where}, made {plan['age_s']:.0f} s ago): "
             + ", ".join(x for x in promises if x)]
    rows = [["task", "variant", "batch", "replicas", "workers"]]
    rows += [[a["task"], a["variant"], str(a["batch_size"]), str(a["replicas"]), " ".join(a["workers"])]
             for a in plan["allocations"]]
    return lines + _table(rows)


def _worker_lines(workers: list[dict]) -> list[str]:
    if not workers:
        return ["workers: none registered"]
    rows = [["worker", "task", "state", "runs", "plan", "queue", "done", "dropped", "shed", "errors",
             "providers", "seen"]]
    for w in workers:
        runs = f"{w['variant']} x{w['batch_size']}" if w["variant"] else "-"
        task = w["task"] + (" (pool)" if w.get("pool") else "") if w["task"] else "(pool)"
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in w["providers"]) or "-"
        seen = "-" if w["last_seen_s"] is None else f"{w['last_seen_s']:.1f} s ago"
        rows.append([w["worker_id"], task, w["state"], runs, f"v{w['plan_version']}" if w["plan_version"] else "-",
                     str(w["queue_length"]), str(w["completed"]), str(w["dropped"]), str(w["shed"]),
                     str(w["errors"]), providers, seen])
    return [f"workers ({len(workers)}):"] + _table(rows)


def _recent_lines(c: dict) -> list[str]:
    r = c["recent"]
    fd = r["frontdoor"]
    span = f"last {r['covered_s']:.0f} s" if r["covered_s"] < r["window_s"] else f"last {r['window_s']:.0f} s"
    failed = sum(fd.get(k, 0) for k in ("dropped", "shed", "invalid", "not_found", "failed"))
    lines = [f"{span} at the front door: {fd.get('received', 0)} requests, {fd.get('ok', 0)} OK, "
             f"{failed} not answered OK ({fd.get('dropped', 0)} dropped, {fd.get('shed', 0)} shed, "
             f"{fd.get('invalid', 0)} invalid, {fd.get('not_found', 0)} unknown model, "
             f"{fd.get('failed', 0)} failed)"]
    w = r["workers"]
    lines.append(f"{span} in the workers: {w.get('completed', 0)} queries done, {w.get('dropped', 0)} dropped "
                 f"(deadline), {w.get('shed', 0)} shed (queue full), {w.get('errors', 0)} errors")
    return lines


def _demand_line(c: dict) -> str:
    d = c["demand"]
    parts = []
    if d.get("estimate_qps") is not None:
        est = f"{d['estimate_qps']:.1f} req/s estimated" + ("" if d.get("estimate_ready") else " (no rate seen yet)")
        parts.append(est)
        if d.get("planned_for_qps") is not None:
            parts.append(f"planned for {d['planned_for_qps']:.1f}")
    if d.get("measured_qps") is not None:
        parts.append(f"{d['measured_qps']:.1f} req/s received")
    cap = d.get("capacity_qps")
    if cap:
        basis = d.get("estimate_qps") if d.get("estimate_qps") is not None else d.get("measured_qps")
        parts.append(f"capacity {cap:.1f} req/s" + (f" ({100 * basis / cap:.0f} % used)" if basis is not None else ""))
    if d.get("admission_rate_qps") is not None:
        parts.append(f"admitting at most {d['admission_rate_qps']:.1f} req/s")
    return "demand: " + (", ".join(parts) if parts else "-")


def format_status(s: dict) -> str:
    """The text ``pipeserve status`` prints for a :func:`gather` result."""
    c = s.get("controller")
    head = f"pipeline {s.get('pipeline')}: controller {s['controller_address']}"
    if c is not None:
        head += f" ({c['mode']}" + (f" on {c['profile']}" if c.get("profile") else "") + ")"
    if s.get("redis_url"):
        head += f", Redis {s['redis_url']}"
    lines = [head]
    if c is None:
        lines.append(f"controller: NOT REACHABLE ({s['controller_error']}); is it running "
                     "(`pipeserve up`, or pipeserve-controller)? Otherwise pass --controller HOST:PORT")
    if s.get("redis_error"):
        lines.append(f"Redis: NOT REACHABLE ({s['redis_error']})")
    redis_plan = (s.get("redis") or {}).get("plan")
    if c is not None:
        if c["plan"] is not None:
            lines += _plan_lines(c["plan"], "controller")
        else:
            lines.append(f"plan: NONE ({c['no_plan_reason']})")
        if c.get("waiting_for_tasks"):
            lines.append("waiting for a worker of task " + ", ".join(c["waiting_for_tasks"])
                         + ": start one (pipeserve-worker --task " + c["waiting_for_tasks"][0] + " ...)")
        if redis_plan is not None and c["plan"] is not None and redis_plan["version"] != c["plan"]["version"]:
            lines.append(f"note: Redis holds plan v{redis_plan['version']}, the controller v{c['plan']['version']}")
        lines += _worker_lines(c["workers"])
        lines.append(_demand_line(c))
        lines += _recent_lines(c)
        cal = c.get("calibration") or {}
        if cal.get("measured_over_profile"):
            lines.append("measured / profile latency: " + ", ".join(
                f"{k} x{v:.2f}" for k, v in cal["measured_over_profile"].items()))
    elif redis_plan is not None:
        lines += _plan_lines(redis_plan, "from Redis")
    elif s.get("redis") is not None:
        lines.append("plan: none in Redis")
    doors = (s.get("redis") or {}).get("frontdoors")
    if doors:
        lines.append("front doors (counts since each started, from Redis):")
        for name, n in doors.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {n[k]}" for k in n))
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", default=os.environ.get("PIPESERVE_CONTROLLER", DEFAULT_CONTROLLER),
                   metavar="HOST:PORT",
                   help="the controller's address (default $PIPESERVE_CONTROLLER or %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="also read the stored plan and the front doors' counters from this Redis "
                        "(default $REDIS_URL; unset: the controller only)")
    p.add_argument("--pipeline", default=None,
                   help="pipeline name for the Redis keys (default: the controller's, else ocr)")
    p.add_argument("--window", type=float, default=60.0, metavar="S",
                   help="recent drops and failures over the last S seconds (default 60, at most 600)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="S",
                   help="refresh every S seconds (default 2) until Ctrl-C")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="first wait up to S seconds until the controller has a plan and every worker "
                        "in it serves (exit 1 if not)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="per-call timeout (default 3 s)")
    add_tls_arguments(p, client_only=True)


def _render(s: dict, as_json: bool) -> str:
    return json.dumps(s, indent=2, sort_keys=True) if as_json else format_status(s)


def run(a: argparse.Namespace) -> int:
    if a.window <= 0 or a.window > 600:
        print("pipeserve status: error: --window must be in (0, 600] seconds", file=sys.stderr)
        return 2
    if (a.watch is not None and a.watch <= 0) or (a.wait is not None and a.wait < 0) or a.timeout <= 0:
        print("pipeserve status: error: --watch, --wait and --timeout must be positive", file=sys.stderr)
        return 2
    try:
        tls = tls_from_args(a)
    except TlsError as exc:
        print(f"pipeserve status: error: {exc}", file=sys.stderr)
        return 2

    def once() -> dict:
        return gather(a.controller, a.redis_url, a.pipeline, tls, a.window, a.timeout)

    s = once()
    if a.wait is not None:
        deadline = time.monotonic() + a.wait
        ready, why = is_ready(s)
        while not ready and time.monotonic() < deadline:
            time.sleep(0.5)
            s = once()
            ready, why = is_ready(s)
        if not ready:
            print(_render(s, a.json))
            print(f"pipeserve status: not ready after {a.wait:g} s: {why}", file=sys.stderr)
            return 1
    if a.watch is None:
        print(_render(s, a.json))
        return 1 if s["controller_error"] or s["redis_error"] else 0
    try:
        while True:
            out = _render(s, a.json)
            if sys.stdout.isatty():
                out = CLEAR + out
            print(out + f"\n({time.strftime('%H:%M:%S')}, every {a.watch:g} s; Ctrl-C stops)", flush=True)
            time.sleep(a.watch)
            s = once()
    except KeyboardInterrupt:
        return 0
