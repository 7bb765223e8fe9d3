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

Hung and dead workers (``services/policy/health.py``): the router keeps each worker's calls
in flight with their expected end and a circuit breaker. A group whose worker is open or
suspect (a call well past its expected end) goes to another usable replica of the stage
(same variant first). When another replica is usable, a call's timeout is its expected
end + margin (not the whole budget) if that leaves time for a second try: a hung worker's
call is abandoned early and the group is sent once more, to another replica (queries are
idempotent); UNAVAILABLE is retried on another replica too, while the deadline allows.

Guarantees: ``route`` returns exactly one QueryResult per input query, in order; a
failure of a worker or child router becomes an explicit status on the affected
queries (UNAVAILABLE, DROPPED_DEADLINE, INTERNAL), never an exception or a hang: every
outbound call carries a timeout of at most the remaining end-to-end budget.
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
from services.policy.health import Candidate, HealthConfig, WorkerHealth, alternative
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
                 on_newer_plan: Callable[[], None] | None = None,
                 health: HealthConfig = HealthConfig()) -> None:
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
        self._call_batch_s: dict[str, float] = {}   # worker id -> its calls' round trip per batch ahead
        self.health = WorkerHealth(health)       # calls in flight and circuit breakers per worker
        self.metrics = RouterMetrics(self, self.task.name,
                                     {v: k.lower() for k, v in pb.QueryStatus.items() if v != 0})

    def set_plan(self, plan: Plan) -> None:
        old = self.plan.workers if self.plan is not None else {}
        for wid, w in plan.workers.items():     # a new variant or batch size: learn its time again
            prev = old.get(wid)
            if prev is not None and (prev.variant, prev.batch_size) != (w.variant, w.batch_size):
                self._batch_s.pop(wid, None)
                self._call_batch_s.pop(wid, None)
        self.health.forget(plan.workers)
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
            wid = self._avoid_unhealthy(plan, wid, weights, request_id)
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

    def _candidates(self, plan: Plan, weights: dict[str, float], exclude: set[str]) -> list[Candidate]:
        return [Candidate(w.worker_id, w.variant, weights.get(w.worker_id, 0.0))
                for w in plan.workers_of(self.task.name) if w.worker_id not in exclude]

    def _other_replica(self, plan: Plan, wid: str, weights: dict[str, float], exclude: set[str]) -> str | None:
        """A usable replica of this stage other than ``exclude`` (same variant as ``wid`` first)."""
        now = self.clock()
        return alternative(plan.workers[wid].variant, self._candidates(plan, weights, exclude),
                           lambda w: self.health.usable(w, now), self.rng.random)

    def _avoid_unhealthy(self, plan: Plan, wid: str, weights: dict[str, float], request_id: str) -> str:
        """``wid``, or another usable replica when ``wid``'s breaker is open or it is suspect."""
        now = self.clock()
        if self.health.usable(wid, now):
            return wid
        alt = self._other_replica(plan, wid, weights, {wid})
        if alt is None:
            return wid                    # nothing better: the plan's choice
        self.metrics.reroutes_unavailable += 1
        log.info("worker_avoided", request_id=request_id, frm=wid, to=alt,
                 state=self.health.state(wid, now).value, suspect=self.health.suspect(wid, now))
        return alt

    def expected_call_s(self, plan: Plan, wid: str, n: int) -> float | None:
        """How long a call of ``n`` queries to ``wid`` should take, behind the queries this
        router has outstanding there: per batch ahead, the larger of the worker's learnt
        batch time and its calls' learnt round trip per batch (queueing, pre-processing and
        transfer included), else the plan's latency figure (None when nothing is known)."""
        w = plan.workers[wid]
        lat = self._batch_s.get(wid)
        if lat is None:
            by_batch = plan.latency_ms.get(w.task, {}).get(w.variant, {})
            ms = by_batch.get(w.batch_size) or (by_batch[max(by_batch)] if by_batch else None)
            lat = None if ms is None else ms / 1000.0
        rtt = self._call_batch_s.get(wid)
        if rtt is not None:
            lat = rtt if lat is None else max(lat, rtt)
        if lat is None:
            return None
        return expected_finish_s(0.0, self._outstanding.get(wid, 0) + n, w.batch_size, lat)

    def _call_timeout_s(self, plan: Plan, wid: str, expected_s: float | None, remaining_s: float,
                        tried: set[str]) -> float:
        """The call's timeout: its expected time + margin when another usable replica could
        take the group after it and that leaves as long again (plus the reserve) for the
        second try; else the remaining budget."""
        if expected_s is None:
            return remaining_s
        short = expected_s + self.health.margin_s(expected_s)
        if 2 * short + self.reserve_ms / 1000.0 > remaining_s:
            return remaining_s
        now = self.clock()
        has_other = any(self.health.usable(w.worker_id, now) for w in plan.workers_of(self.task.name)
                        if w.worker_id not in tried)
        return short if has_other else remaining_s

    def _observe_call(self, wid: str, batches: int, call_s: float) -> None:
        """A successful call's round trip per batch ahead of it: up at once, down slowly
        (a call's timeout must not follow a few fast calls down below a normal slow one)."""
        x = call_s / max(1, batches)
        prev = self._call_batch_s.get(wid)
        self._call_batch_s[wid] = x if prev is None or x > prev else prev + 0.1 * (x - prev)

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
        hung_retried = False
        while True:
            now = self.clock()
            remaining = deadline_s - now
            if remaining <= 0:
                for q, i in zip(queries, idx):
                    out[i] = _fail(q.query_id, pb.DROPPED_DEADLINE, "deadline passed before dispatch",
                                   self.task.name)
                return
            w = plan.workers[wid]
            req = pb.InferBatchRequest(request_id=request_id, task=self.task.name, deadline_unix_s=deadline_s,
                                       downstream_reserve_ms=self.reserve_ms, plan_version=plan.version,
                                       queries=queries)
            expected = self.expected_call_s(plan, wid, len(queries))
            timeout = remaining if hung_retried else self._call_timeout_s(plan, wid, expected, remaining, tried)
            token = self.health.call_started(wid, now, remaining if expected is None else expected)
            failed: bool | None = None      # unknown (cancelled) unless set below
            sent_to = wid
            ahead = -(-(self._outstanding.get(wid, 0) + len(queries)) // max(1, w.batch_size))
            self._outstanding[sent_to] = self._outstanding.get(sent_to, 0) + len(queries)
            try:
                t_call = time.perf_counter()
                resp = await self.workers.infer(w.address, req, timeout)
                call_ms = (time.perf_counter() - t_call) * 1e3
                if len(resp.results) != len(queries):
                    raise CallFailed(pb.INTERNAL, f"worker {wid} returned {len(resp.results)} results "
                                                  f"for {len(queries)} queries")
                failed = False
                self._observe_batch(wid, resp.results)
                self._observe_call(wid, ahead, call_ms / 1e3)
                self._newer(resp.plan_version)
                for r, i in zip(resp.results, idx):
                    r.call_ms = call_ms   # the latency breakdown's router <-> worker round trip
                    out[i] = r
                return
            except CallFailed as exc:
                # our early timeout fired (the request's deadline has not passed): abandoned
                abandoned = exc.status == pb.DROPPED_DEADLINE and timeout < remaining
                failed = abandoned or exc.status == pb.UNAVAILABLE or (
                    exc.status == pb.DROPPED_DEADLINE and self.health.suspect(wid, self.clock()))
                if failed:
                    nxt = self._other_replica(plan, wid, weights, tried)
                    if nxt is None and not abandoned:   # one worker down: any other the plan weighs
                        others = {k: v for k, v in weights.items() if k not in tried and v > 0}
                        nxt = pick_weighted(others, self.rng.random()) if others else None
                    elif nxt is None and not hung_retried:
                        # the other replica the short timeout counted on is no longer usable:
                        # the same worker again, with the whole remaining budget, not a drop
                        nxt = wid
                    if nxt is not None and deadline_s - self.clock() > 0:
                        self.metrics.reroutes_unavailable += 1
                        log.warning("worker_hung_retried" if abandoned else "worker_unavailable_rerouted",
                                    request_id=request_id, frm=wid, to=nxt, timeout_ms=round(timeout * 1e3, 1))
                        hung_retried = hung_retried or abandoned
                        wid = nxt
                        tried.add(wid)
                        continue
                for q, i in zip(queries, idx):
                    out[i] = _fail(q.query_id, exc.status, exc.message, self.task.name)
                return
            finally:
                self._outstanding[sent_to] -= len(queries)
                changed = self.health.call_ended(token, self.clock(), failed)
                if changed is not None:
                    log.warning("worker_breaker", worker=sent_to, state=changed.value)

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
