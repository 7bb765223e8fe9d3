"""RouterCore with hand-written fakes of its two outbound interfaces."""
import asyncio
import random

import pytest

from services.common.plan import ANY_PATH, Plan, WorkerAssignment
from services.common.spec import parse_spec
from services.gen import pipeserve_pb2 as pb
from services.router.core import CallFailed, RouterCore

SPEC = parse_spec({
    "name": "ocr", "slo_ms": 1000,
    "tasks": [
        {"name": "det", "children": ["rec"], "variants": [
            {"name": "d1", "model": "d", "processor": "k"}, {"name": "d2", "model": "d", "processor": "k"}]},
        {"name": "rec", "variants": [{"name": "r1", "model": "r", "processor": "k"}]},
    ],
})


def plan(weights):
    workers = {"det-a": WorkerAssignment("det-a", "a:1", "det", "d1", 2),
               "det-b": WorkerAssignment("det-b", "b:1", "det", "d2", 2),
               "rec-0": WorkerAssignment("rec-0", "r:1", "rec", "r1", 8)}
    return Plan(5, "ocr", workers, {"det": {ANY_PATH: weights}, "rec": {ANY_PATH: {"rec-0": 1.0}}})


class FakeWorkers:
    """Detectors return n regions with a child payload each; configurable failures."""

    def __init__(self, regions=3, fail=None):
        self.regions = regions
        self.fail = fail or {}
        self.calls = []

    async def infer(self, address, request, timeout_s):
        self.calls.append((address, [q.query_id for q in request.queries], timeout_s))
        if address in self.fail:
            raise self.fail[address]
        variant = {"a:1": "d1", "b:1": "d2"}[address]
        out = []
        for q in request.queries:
            r = pb.QueryResult(query_id=q.query_id, status=pb.OK, variant=variant, task="det")
            for i in range(self.regions):
                r.regions.add(points=[i] * 8, score=0.9)
                r.child_payloads.append(b"crop%d" % i)
            out.append(r)
        return pb.InferBatchResponse(results=out, plan_version=5)


class FakeChildren:
    def __init__(self, drop_index=None):
        self.calls = []
        self.drop_index = drop_index

    async def route(self, task, request, timeout_s):
        self.calls.append((task, request.upstream_path, [q.query_id for q in request.queries]))
        results = []
        for i, q in enumerate(request.queries):
            status = pb.DROPPED_DEADLINE if i == self.drop_index else pb.OK
            r = pb.QueryResult(query_id=q.query_id, status=status, variant="r1", task=task)
            r.regions.add(text=q.payload.decode(), confidence=0.5)
            results.append(r)
        return pb.RouteResponse(results=results)


def run(core, n=1, deadline_in=10.0):
    queries = [pb.Query(query_id=f"q{i}", payload=b"page") for i in range(n)]
    return asyncio.run(core.route("req", core.clock() + deadline_in, queries, ""))


def make(workers, children, weights=None, seed=0):
    core = RouterCore(SPEC, "det", workers, children, rng=random.Random(seed))
    core.set_plan(plan(weights or {"det-a": 1.0}))
    return core


def test_one_result_per_query_with_children_attached_in_region_order():
    workers, children = FakeWorkers(regions=3), FakeChildren()
    results = run(make(workers, children), n=2)
    assert [r.query_id for r in results] == ["q0", "q1"]
    for r in results:
        assert r.status == pb.OK and len(r.children) == 3 and not r.child_payloads
        assert [c.regions[0].text for c in r.children] == ["crop0", "crop1", "crop2"]
        assert [c.query_id for c in r.children] == [f"{r.query_id}.{i}" for i in range(3)]
    # both pages went to the worker in one message, and all 6 crops to the child in one
    assert len(workers.calls) == 1 and workers.calls[0][1] == ["q0", "q1"]
    assert children.calls == [("rec", "d1", ["q0.0", "q0.1", "q0.2", "q1.0", "q1.1", "q1.2"])]


def test_child_calls_are_grouped_by_upstream_variant_path():
    workers, children = FakeWorkers(regions=1), FakeChildren()
    run(make(workers, children, {"det-a": 0.5, "det-b": 0.5}, seed=3), n=20)
    paths = sorted(c[1] for c in children.calls)
    assert paths == ["d1", "d2"]


def test_routing_follows_the_plan_weights():
    workers, children = FakeWorkers(regions=0), FakeChildren()
    core = make(workers, children, {"det-a": 0.8, "det-b": 0.2}, seed=1)
    counts = {"a:1": 0, "b:1": 0}
    for _ in range(300):
        workers.calls.clear()
        run(core)
        counts[workers.calls[0][0]] += 1
    assert 0.72 < counts["a:1"] / 300 < 0.88


def test_unavailable_worker_is_retried_on_another():
    workers = FakeWorkers(regions=1, fail={"a:1": CallFailed(pb.UNAVAILABLE, "down")})
    [r] = run(make(workers, FakeChildren(), {"det-a": 0.99, "det-b": 0.01}))
    assert r.status == pb.OK and r.variant == "d2"
    assert [c[0] for c in workers.calls] == ["a:1", "b:1"]


def test_failures_become_explicit_statuses():
    workers = FakeWorkers(fail={"a:1": CallFailed(pb.DROPPED_DEADLINE, "late")})
    [r] = run(make(workers, FakeChildren()))
    assert r.status == pb.DROPPED_DEADLINE and "late" in r.message
    [r] = run(make(FakeWorkers(), FakeChildren()), deadline_in=-1.0)
    assert r.status == pb.DROPPED_DEADLINE


def test_a_dropped_child_is_reported_in_the_tree():
    [r] = run(make(FakeWorkers(regions=3), FakeChildren(drop_index=1)))
    assert r.status == pb.OK
    assert [c.status for c in r.children] == [pb.OK, pb.DROPPED_DEADLINE, pb.OK]


def test_outbound_timeouts_are_the_remaining_budget():
    workers = FakeWorkers(regions=0)
    run(make(workers, FakeChildren()), deadline_in=2.0)
    assert 1.5 < workers.calls[0][2] <= 2.0


def test_most_accurate_first_below_the_planned_rate():
    """Planned: 20 pages/s split 50/50 between an accurate and a cheap detector. At a
    quarter of that rate MostAccurateFirst sends everything to the accurate one; at the
    planned rate the plan's split holds."""
    from dataclasses import replace

    now = [1000.0]
    workers, children = FakeWorkers(regions=0), FakeChildren()
    core = RouterCore(SPEC, "det", workers, children, rng=random.Random(2), clock=lambda: now[0])
    base = plan({"det-a": 0.5, "det-b": 0.5})
    core.set_plan(replace(base, planned_qps={"det": {ANY_PATH: 20.0}},
                          worker_accuracy={"det-a": 0.99, "det-b": 0.90, "rec-0": 0.95}))

    def drive(rate, seconds):
        seen = {"a:1": 0, "b:1": 0}
        for _ in range(int(rate * seconds)):
            now[0] += 1.0 / rate
            workers.calls.clear()
            asyncio.run(core.route("r", now[0] + 10, [pb.Query(query_id="q", payload=b"p")], ""))
            seen[workers.calls[0][0]] += 1
        return seen

    drive(5.0, 10)                                   # let the rate estimate settle at 5/s
    low = drive(5.0, 10)
    assert core.load_ratio("") == pytest.approx(0.25, rel=0.2)
    assert low["b:1"] == 0 and low["a:1"] == 50      # 5/s fits in det-a's planned 10/s
    drive(20.0, 10)
    at_plan = drive(20.0, 10)
    assert 0.35 < at_plan["a:1"] / 200 < 0.65        # the plan's 50/50 split


class TimedRecWorkers:
    """Recognisers that report a fixed batch time per address."""

    def __init__(self, batch_ms):
        self.batch_ms = batch_ms
        self.calls = []

    async def infer(self, address, request, timeout_s):
        self.calls.append(address)
        return pb.InferBatchResponse(results=[
            pb.QueryResult(query_id=q.query_id, status=pb.OK, variant="r1", task="rec",
                           service_ms=self.batch_ms[address], batch_size=len(request.queries))
            for q in request.queries], plan_version=5)


def test_a_child_stage_reroutes_a_group_its_worker_would_finish_too_late():
    """rec-slow takes 2 s a batch, rec-fast 10 ms (learnt from replies). With 1 s left,
    a group the weights send to rec-slow goes to rec-fast; with 10 s left it stays."""
    now = [1000.0]
    workers = TimedRecWorkers({"s:1": 2000.0, "f:1": 10.0})
    core = RouterCore(SPEC, "rec", workers, FakeChildren(), rng=random.Random(0), clock=lambda: now[0])
    assigned = {"rec-slow": WorkerAssignment("rec-slow", "s:1", "rec", "r1", 4),
                "rec-fast": WorkerAssignment("rec-fast", "f:1", "rec", "r1", 4)}

    def route_via(wid, deadline_in):
        core.set_plan(Plan(5, "ocr", assigned, {"rec": {ANY_PATH: {wid: 1.0}}}))
        workers.calls.clear()
        res = asyncio.run(core.route("r", now[0] + deadline_in, [pb.Query(query_id="q", payload=b"c")], "d1"))
        assert [r.status for r in res] == [pb.OK]
        return workers.calls

    assert route_via("rec-fast", 10.0) == ["f:1"]       # learn both batch times
    assert route_via("rec-slow", 10.0) == ["s:1"]
    assert route_via("rec-slow", 1.0) == ["f:1"]        # 2 s > 1 s left: rerouted
    assert route_via("rec-slow", 10.0) == ["s:1"]       # on time: the plan's choice
    core.reroute = False
    assert route_via("rec-slow", 1.0) == ["s:1"]        # switched off: the plan's choice, dropped late
