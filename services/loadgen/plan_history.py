"""The plan in force during a load run, sampled every second: the plan history.

:class:`PlanSampler` runs beside the sender (its own asyncio task; the sending loop never
waits on it) and records one sample per ``interval_s``:

* from the controller (``controller=HOST:PORT``): its ``ClusterStatus`` RPC gives the plan
  in force and every registered worker, so a sample also counts *parked* workers
  (registered, not in the plan) and *missing* ones (in the plan, not registered), and the
  controller's demand estimate; a controller without ``ClusterStatus`` is read with
  ``GetPlan`` instead;
* from Redis (``redis_url``): the plan key ``pipeserve:<pipeline>:plan``
  (services/common/plan_channel.py), which every router and worker follows.

With both, the controller is asked first and Redis is the fallback. A sample that could
not be read is kept as ``{"t_s": ..., "error": "..."}`` (the history has no silent gaps).

Sample fields (:func:`sample_from_plan`, :func:`sample_from_status`): ``t_s`` (seconds
from the run's start), ``version``, ``plan_source``, ``capacity_qps``,
``expected_accuracy``, ``admission_rate_qps``, ``workers`` (``"task/variant" -> count``
of workers the plan runs), ``active_workers`` (their total), and from the controller also
``registered``, ``parked``, ``missing`` (worker counts) and ``demand_qps``.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any, Mapping

import grpc

from services.common.grpc_utils import TlsConfig, make_channel
from services.common.plan import Plan
from services.common.plan_channel import connect, plan_key
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 2.0
# stop() waits at most this long for the sampling task and for each connection to close:
# longer than one sample can take (Redis socket timeout 5 s, RPC 2 s)
STOP_TIMEOUT_S = 10.0


def sample_from_plan(plan: Plan | None, t_s: float) -> dict:
    """A sample of a plan as stored in Redis (None: no plan published yet)."""
    if plan is None:
        return {"t_s": round(t_s, 3), "version": None, "workers": {}, "active_workers": 0}
    counts = Counter(f"{w.task}/{w.variant}" for w in plan.workers.values())
    return {
        "t_s": round(t_s, 3), "version": plan.version, "plan_source": plan.source,
        "capacity_qps": plan.capacity_qps, "expected_accuracy": plan.expected_accuracy,
        "admission_rate_qps": plan.admission_rate_qps,
        "workers": dict(sorted(counts.items())), "active_workers": sum(counts.values()),
    }


def sample_from_status(status: Mapping[str, Any], t_s: float) -> dict:
    """A sample of the controller's ``ClusterStatus`` JSON (services/controller/status.py)."""
    plan = status.get("plan") or {}
    counts: Counter = Counter()
    for a in plan.get("allocations") or []:
        counts[f"{a['task']}/{a['variant']}"] += int(a.get("replicas", len(a.get("workers", []))))
    workers = status.get("workers") or []
    missing = sum(1 for w in workers if w.get("state") == "missing")
    registered = len(workers) - missing
    parked = sum(1 for w in workers if w.get("state") != "missing" and w.get("planned") is None)
    demand = status.get("demand") or {}
    return {
        "t_s": round(t_s, 3), "version": plan.get("version"), "plan_source": plan.get("source"),
        "capacity_qps": plan.get("capacity_qps"), "expected_accuracy": plan.get("expected_accuracy"),
        "admission_rate_qps": plan.get("admission_rate_qps"),
        "workers": dict(sorted(counts.items())), "active_workers": sum(counts.values()),
        "registered": registered, "parked": parked, "missing": missing,
        "demand_qps": demand.get("estimate_qps"),
    }


class PlanSampler:
    """Samples the plan in force every ``interval_s`` seconds between :meth:`start` and
    :meth:`stop`; ``samples`` is the history, in time order."""

    def __init__(self, pipeline: str, *, redis_url: str | None = None,
                 controller: str | None = None, tls: TlsConfig | None = None,
                 interval_s: float = 1.0) -> None:
        if not redis_url and not controller:
            raise ValueError("the plan history needs a Redis URL or a controller address")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.pipeline = pipeline
        self.redis_url = redis_url
        self.controller = controller
        self.tls = tls
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._task: asyncio.Task | None = None
        self._redis = None
        self._channel: grpc.aio.Channel | None = None
        self._status_rpc = True   # False once the controller said UNIMPLEMENTED
        self._stopping = False
        self._start = 0.0

    async def _from_controller(self, t_s: float) -> dict:
        stub = pb_grpc.ControllerStub(self._channel)
        if self._status_rpc:
            try:
                resp = await stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=RPC_TIMEOUT_S)
                return sample_from_status(json.loads(resp.status_json), t_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._status_rpc = False
        try:
            resp = await stub.GetPlan(pb.GetPlanRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "no plan" in (exc.details() or ""):
                return sample_from_plan(None, t_s)
            raise
        return sample_from_plan(Plan.from_json(resp.plan_json, source="controller"), t_s)

    async def _from_redis(self, t_s: float) -> dict:
        raw = await self._redis.get(plan_key(self.pipeline))
        return sample_from_plan(None if raw is None else Plan.from_json(raw, source="redis"), t_s)

    async def sample(self, t_s: float) -> dict:
        """One sample (never raises: a failure becomes an ``error`` sample)."""
        errors = []
        if self.controller:
            try:
                return {**await self._from_controller(t_s), "from": "controller"}
            except Exception as exc:   # noqa: BLE001 - recorded in the history
                errors.append(f"controller: {type(exc).__name__}: {exc}"[:300])
        if self.redis_url:
            try:
                return {**await self._from_redis(t_s), "from": "redis"}
            except Exception as exc:   # noqa: BLE001
                errors.append(f"redis: {type(exc).__name__}: {exc}"[:300])
        return {"t_s": round(t_s, 3), "error": "; ".join(errors)}

    async def _loop(self, start: float) -> None:
        n = 0
        while not self._stopping:
            now = time.monotonic()
            self.samples.append(await self.sample(now - start))
            n += 1
            # sample on the grid start + n * interval (no drift); skip ticks missed
            n = max(n, int((time.monotonic() - start) / self.interval_s) + 1)
            await asyncio.sleep(max(0.0, start + n * self.interval_s - time.monotonic()))

    async def start(self, start: float | None = None) -> None:
        """Begin sampling; ``start`` (``time.monotonic()`` seconds) is the run's t = 0."""
        if self.controller:
            self._channel = make_channel(self.controller, tls=self.tls)
        if self.redis_url:
            self._redis = connect(self.redis_url)
        self._start = time.monotonic() if start is None else start
        self._stopping = False
        self._task = asyncio.create_task(self._loop(self._start))

    async def stop(self) -> list[dict]:
        """Stop sampling and close the connections, each wait bounded (a wait that runs
        out is recorded as an ``error`` sample); returns the samples.

        The loop stops on a flag as well as on ``cancel()``: on Python 3.11
        ``asyncio.wait_for`` (which redis-py awaits inside every command) swallows a
        cancel that lands just as the command completes (CPython gh-86296), and a loop
        stopped by ``cancel()`` alone would then sample on for ever."""
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            await self._bounded(self._task, "the sampling task did not stop")
            self._task = None
        if self._channel is not None:
            await self._bounded(self._channel.close(), "the controller channel did not close")
        if self._redis is not None:
            await self._bounded(self._redis.aclose(), "the Redis connection did not close")
        return self.samples

    async def _bounded(self, awaitable, what: str) -> None:
        """Wait at most STOP_TIMEOUT_S for ``awaitable``; past that, say so in the history
        and leave it (a stuck close must not hang the run)."""
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:
            self.samples.append({"t_s": round(time.monotonic() - self._start, 3),
                                 "error": f"{what} within {STOP_TIMEOUT_S:g} s; left behind"})
        elif not task.cancelled():
            task.result()   # a close that failed raises, as before
