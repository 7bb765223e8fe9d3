"""The router core for one stage: choose workers by the plan's routing weights with
MostAccurateFirst (``services/policy/routing.py``: below the planned rate of a path the
most accurate workers take it first; at the planned rate exactly the plan's split), send
each worker its queries in one message, fan region outputs out to the child stages' routers
(all crops of a variant group in one message), gather and return results.

Opportunistic rerouting: the router counts the queries each worker has not answered yet
and learns each worker's batch time from the replies; a group whose chosen worker would
leave it less than ``REROUTE_SLACK`` of the SLO as slack goes to the worker of the stage
that finishes it first, if that one makes the deadline (``reroute_choice``, the
simulator's rule).

Guarantees: ``route`` returns exactly one QueryResult per input query, in order; a
failure of a worker or child router becomes an explicit status on the affected
queries (UNAVAILABLE, DROPPED_DEADLINE, INTERNAL), never an exception or a hang: every
outbound call carries a timeout equal to the remaining end-to-end budget.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Callable, Protocol

from services.common.errors import Unavailable
from services.common.logging import get_logger
from services.common.metrics import RouterMetrics
from services.common.plan import Plan
from services.common.spec import PipelineSpec
from services.gen import pipeserve_pb2 as pb
from services.policy.reserve import RoundTripFloor, downstream_reserves
from services.policy.routing import (REROUTE_SLACK, StageRouting, expected_finish_s, pick_weighted,
                                     reroute_choice)

log = get_logger(__name__)


class CallFailed(Exception):
    """An outbound call failed; ``status`` is the QueryStatus to give its queries."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WorkerCaller(Protocol):
    async def infer(self, address: str, request: pb.InferBatchRequest, timeout_s: float
                    ) -> pb.InferBatchResponse: ...


class ChildCaller(Protocol):
    async def route(self, task: str, request: pb.RouteRequest, timeout_s: float) -> pb.RouteResponse: ...


def _fail(query_id: str, status: int, message: str, task: str) -> pb.QueryResult:
    return pb.QueryResult(query_id=query_id, status=status, message=message, task=task)


class RouterCore:
    """``on_newer_plan()`` is called when a worker or child router answers with a newer
    plan version than this router runs (the router then re-reads the plan at once).

    The downstream reserve sent with every query (``reserve_ms``): the configured value;
    else, when the plan carries latency figures, the policy's rule
    (``services.policy.reserve.downstream_reserves``, the simulator's); else the fastest
    recent *successful* child round trip."""

    def __init__(self, spec: PipelineSpec, task: str, workers: WorkerCaller, children: ChildCaller,
                 *, reserve_ms: float | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time,
                 on_newer_plan: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.task = spec.task(task)
        self.workers = workers
        self.children = children
        self.fixed_reserve_ms = reserve_ms
        self.rng = rng or random.Random()
        self.clock = clock
        self.on_newer_plan = on_newer_plan
        self.plan: Plan | None = None
        self.routing = StageRouting(self.task.name)
        self._child_rtt = RoundTripFloor()
        self._plan_reserve_s: float | None = None
        self._tree = {t.name: tuple(t.children) for t in spec.tasks}
        self.reroute = True      # opportunistic rerouting (reroute_target), as in the simulator
        self._outstanding: dict[str, int] = {}   # worker id -> queries sent, not answered yet
        self._batch_s: dict[str, float] = {}     # worker id -> moving average of its batch time
        self.metrics = RouterMetrics(self, self.task.name,
                                     {v: k.lower() for k, v in pb.QueryStatus.items() if v != 0})

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.routing.set_plan(plan.routing.get(self.task.name, {}), plan.planned_qps.get(self.task.name, {}),
                              plan.worker_accuracy)
        fastest = plan.fastest_s()
        self._plan_reserve_s = downstream_reserves(self._tree, fastest)[self.task.name] if fastest else None

    def load_ratio(self, upstream_path: str) -> float:
        """Observed / planned query rate of this stage along ``upstream_path`` (1.0 when
        the plan states no rate or nothing has been measured yet)."""
        self.routing.advance(self.clock())
        return self.routing.load_ratio(upstream_path)

    @property
    def reserve_ms(self) -> float:
        """Time the stages below still need (see the class docstring)."""
        if self.fixed_reserve_ms is not None:
            return self.fixed_reserve_ms
        if not self.task.children:
            return 0.0
        if self._plan_reserve_s is not None:
            return self._plan_reserve_s * 1000.0
        measured = self._child_rtt.value()
        return 0.0 if measured is None else measured * 1000.0

    def ready(self) -> bool:
        return self.plan is not None and bool(self.plan.workers_of(self.task.name))

    def _newer(self, version: int) -> None:
        if self.plan is not None and version > self.plan.version and self.on_newer_plan is not None:
            self.on_newer_plan()

    async def route(self, request_id: str, deadline_s: float, queries: list[pb.Query],
                    upstream_path: str) -> list[pb.QueryResult]:
        t0 = time.perf_counter()
        plan = self.plan
        if plan is None:
            raise Unavailable(f"router for {self.task.name!r} has no plan yet")
        weights = dict(plan.weights_for(self.task.name, upstream_path))
        self.routing.advance(self.clock())
        split = self.routing.split(upstream_path, len(queries), self.rng.random)
        if not split:
            raise Unavailable(f"plan v{plan.version} routes no traffic for {self.task.name!r}")
        groups: dict[str, list[int]] = {}
        i = 0
        for wid, n in split.items():
            if self.reroute:
                wid = self.reroute_target(plan, wid, n, deadline_s)
            groups.setdefault(wid, []).extend(range(i, i + n))
            i += n
        results: list[pb.QueryResult | None] = [None] * len(queries)
        calls = [self._run_worker_group(plan, wid, queries if len(groups) == 1 else [queries[i] for i in idx],
                                        idx, results, request_id, deadline_s, weights)
                 for wid, idx in groups.items()]
        if len(calls) == 1:
            await calls[0]            # the common case: no gather, no extra task
        else:
            await asyncio.gather(*calls)
        final = [r if r is not None else _fail(q.query_id, pb.INTERNAL, "no result", self.task.name)
                 for q, r in zip(queries, results)]
        self.metrics.stage_done(final, time.perf_counter() - t0)
        if self.task.children:
            await self._fan_out(final, request_id, deadline_s, upstream_path)
        self.metrics.route_done(time.perf_counter() - t0)
        return final

    def reroute_target(self, plan: Plan, wid: str, n: int, deadline_s: float) -> str:
        """``wid``, or the worker of this stage that finishes ``n`` more queries first if
        ``wid`` would leave them too little slack (workers with no measured batch time yet are
        not estimated: ``wid`` among them is kept)."""
        now = self.clock()
        reserve_s, slack_s = self.reserve_ms / 1000.0, REROUTE_SLACK * self.spec.slo_ms / 1000.0
        lat, mine = self._batch_s.get(wid), plan.workers.get(wid)
        if lat is None or mine is None or expected_finish_s(
                now, self._outstanding.get(wid, 0) + n, mine.batch_size, lat) + reserve_s + slack_s <= deadline_s:
            return wid                     # the common case: no need to look at the others
        finish: dict[str, float] = {}
        for w in plan.workers_of(self.task.name):
            lat = self._batch_s.get(w.worker_id)
            if lat is not None:
                finish[w.worker_id] = expected_finish_s(now, self._outstanding.get(w.worker_id, 0) + n,
                                                        w.batch_size, lat)
        target = reroute_choice(wid, finish, deadline_s, reserve_s, slack_s)
        if target != wid:
            self.metrics.reroutes_slack += 1
            log.info("rerouted", task=self.task.name, queries=n, frm=wid, to=target,
                     slack_ms=round((deadline_s - finish[wid] - reserve_s) * 1e3, 1))
        return target

    def _observe_batch(self, wid: str, results) -> None:
        times = [r.service_ms for r in results if r.batch_size > 0 and r.service_ms > 0]
        if times:
            x = max(times) / 1000.0
            prev = self._batch_s.get(wid)
            self._batch_s[wid] = x if prev is None else prev + 0.3 * (x - prev)

    async def _run_worker_group(self, plan: Plan, wid: str, queries: list[pb.Query], idx: list[int],
                                out: list, request_id: str, deadline_s: float,
                                weights: dict[str, float]) -> None:
        tried = {wid}
        while True:
            remaining = deadline_s - self.clock()
            if remaining <= 0:
                for q, i in zip(queries, idx):
                    out[i] = _fail(q.query_id, pb.DROPPED_DEADLINE, "deadline passed before dispatch",
                                   self.task.name)
                return
            w = plan.workers[wid]
            req = pb.InferBatchRequest(request_id=request_id, task=self.task.name, deadline_unix_s=deadline_s,
                                       downstream_reserve_ms=self.reserve_ms, plan_version=plan.version,
                                       queries=queries)
            sent_to = wid
            self._outstanding[sent_to] = self._outstanding.get(sent_to, 0) + len(queries)
            try:
                t_call = time.perf_counter()
                resp = await self.workers.infer(w.address, req, remaining)
                call_ms = (time.perf_counter() - t_call) * 1e3
                if len(resp.results) != len(queries):
                    raise CallFailed(pb.INTERNAL, f"worker {wid} returned {len(resp.results)} results "
                                                  f"for {len(queries)} queries")
                self._observe_batch(wid, resp.results)
                self._newer(resp.plan_version)
                for r, i in zip(resp.results, idx):
                    r.call_ms = call_ms   # the latency breakdown's router <-> worker round trip
                    out[i] = r
                return
            except CallFailed as exc:
                others = {k: v for k, v in weights.items() if k not in tried and v > 0}
                if exc.status == pb.UNAVAILABLE and others:
                    wid = pick_weighted(others, self.rng.random())   # one worker down: try another
                    tried.add(wid)
                    self.metrics.reroutes_unavailable += 1
                    log.warning("worker_unavailable_rerouted", request_id=request_id, to=wid)
                    continue
                for q, i in zip(queries, idx):
                    out[i] = _fail(q.query_id, exc.status, exc.message, self.task.name)
                return
            finally:
                self._outstanding[sent_to] -= len(queries)

    async def _fan_out(self, results: list[pb.QueryResult], request_id: str, deadline_s: float,
                       upstream_path: str) -> None:
        """Send every OK result's region payloads to each child stage, one call per
        (child task, upstream variant path), and attach the child results.

        ``children`` of a result holds, for each child task in spec order, one result per
        region: ``children[j * n_regions + i]`` is child task j's result for region i.
        """
        parents = [r for r in results if r.status == pb.OK and r.child_payloads]
        if not parents:
            return
        by_path: dict[str, list[pb.QueryResult]] = {}
        for r in parents:
            by_path.setdefault(f"{upstream_path}/{r.variant}" if upstream_path else r.variant, []).append(r)
        calls, keys = [], []
        for child in self.task.children:
            for path, members in by_path.items():
                calls.append(self._call_child(child, path, members, request_id, deadline_s))
                keys.append((child, members))
        t0 = time.perf_counter()
        outputs = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        children_ms = (time.perf_counter() - t0) * 1e3
        # only successful round trips bound the reserve: a call that failed at once (its
        # deadline had passed) says nothing about what the stages below need
        self._child_rtt.observe(time.perf_counter() - t0,
                                ok=all(r.status == pb.OK for out in outputs for r in out))
        gathered: dict[tuple[str, str], list[pb.QueryResult]] = {}
        for (child, members), child_results in zip(keys, outputs):
            k = 0
            for r in members:
                n = len(r.child_payloads)
                gathered[(child, r.query_id)] = child_results[k:k + n]
                k += n
        for r in parents:
            for child in self.task.children:
                r.children.extend(gathered[(child, r.query_id)])
            del r.child_payloads[:]
            r.children_ms = children_ms

    async def _call_child(self, child: str, path: str, parents: list[pb.QueryResult],
                          request_id: str, deadline_s: float) -> list[pb.QueryResult]:
        queries = [pb.Query(query_id=f"{r.query_id}.{i}", payload=payload)
                   for r in parents for i, payload in enumerate(r.child_payloads)]
        remaining = deadline_s - self.clock()
        try:
            if remaining <= 0:
                raise CallFailed(pb.DROPPED_DEADLINE, "deadline passed before the child stage")
            resp = await self.children.route(child, pb.RouteRequest(
                request_id=request_id, deadline_unix_s=deadline_s, queries=queries, upstream_path=path),
                remaining)
            if len(resp.results) != len(queries):
                raise CallFailed(pb.INTERNAL, f"child router {child} returned {len(resp.results)} "
                                              f"results for {len(queries)} queries")
            self._newer(resp.plan_version)
            return list(resp.results)
        except CallFailed as exc:
            return [_fail(q.query_id, exc.status, exc.message, child) for q in queries]
