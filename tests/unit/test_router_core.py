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


class ChildrenThatFailAtOnce(FakeChildren):
    """A child router that answers DROPPED_DEADLINE immediately (the deadline passed)."""

    def __init__(self, delay_s=0.0, fail=False):
        super().__init__()
        self.delay_s, self.fail = delay_s, fail

    async def route(self, task, request, timeout_s):
        await asyncio.sleep(self.delay_s)
        resp = await super().route(task, request, timeout_s)
        if self.fail:
            for r in resp.results:
                r.status = pb.DROPPED_DEADLINE
        return resp


def test_failed_child_calls_do_not_collapse_the_downstream_reserve():
    """Regression: the reserve was the fastest of the last 200 child round trips, failures
    included, so one late request took it from ~120 ms to ~0.1 ms for the next 199."""
    children = ChildrenThatFailAtOnce(delay_s=0.12)
    core = make(FakeWorkers(regions=2), children)
    run(core)
    assert 110 <= core.reserve_ms <= 500
    children.delay_s, children.fail = 0.0, True      # now every child call fails at once
    for _ in range(5):
        run(core)
    assert 110 <= core.reserve_ms <= 500, core.reserve_ms


def test_the_reserve_follows_the_plan_figures_with_the_simulators_rule():
    from dataclasses import replace

    from services.policy.reserve import downstream_reserves

    core = make(FakeWorkers(regions=0), FakeChildren())
    base = core.plan
    core.set_plan(replace(base, latency_ms={"det": {"d1": {1: 40.0}, "d2": {1: 20.0}},
                                            "rec": {"r1": {1: 3.0, 8: 12.0}}}))
    assert core.reserve_ms == pytest.approx(3.0)     # rec's fastest single query; rec is a leaf
    assert downstream_reserves({"det": ("rec",), "rec": ()}, {"rec": 0.003})["det"] == pytest.approx(0.003)
    rec = RouterCore(SPEC, "rec", FakeWorkers(), FakeChildren())
    rec.set_plan(core.plan)
    assert rec.reserve_ms == 0.0


TWO_CHILDREN = parse_spec({
    "name": "tree", "slo_ms": 1000,
    "tasks": [
        {"name": "det", "children": ["rec", "cls"], "variants": [{"name": "d1", "model": "d", "processor": "k"}]},
        {"name": "rec", "variants": [{"name": "r1", "model": "r", "processor": "k"}]},
        {"name": "cls", "variants": [{"name": "c1", "model": "c", "processor": "k"}]},
    ],
})


def test_a_router_with_two_child_stages_sends_every_region_to_both_and_joins_them():
    workers, children = FakeWorkers(regions=2), FakeChildren(drop_index=None)
    core = RouterCore(TWO_CHILDREN, "det", workers, children, rng=random.Random(0))
    assigned = {"det-a": WorkerAssignment("det-a", "a:1", "det", "d1", 2),
                "rec-0": WorkerAssignment("rec-0", "r:1", "rec", "r1", 8),
                "cls-0": WorkerAssignment("cls-0", "c:1", "cls", "c1", 8)}
    core.set_plan(Plan(1, "tree", assigned, {"det": {ANY_PATH: {"det-a": 1.0}}, "rec": {ANY_PATH: {"rec-0": 1.0}},
                                             "cls": {ANY_PATH: {"cls-0": 1.0}}}))
    [r] = run(core)
    assert sorted(c[0] for c in children.calls) == ["cls", "rec"]
    for task, path, ids in children.calls:
        assert path == "d1" and ids == ["q0.0", "q0.1"]
    # children[j * n_regions + i]: child task j (spec order: rec, cls) for region i
    assert [c.task for c in r.children] == ["rec", "rec", "cls", "cls"]
    assert [c.regions[0].text for c in r.children] == ["crop0", "crop1", "crop0", "crop1"]


def test_a_newer_plan_version_in_a_reply_makes_the_router_re_read_the_plan():
    pokes = []
    workers = FakeWorkers(regions=0)
    core = RouterCore(SPEC, "det", workers, FakeChildren(), rng=random.Random(0), on_newer_plan=lambda: pokes.append(1))
    core.set_plan(plan({"det-a": 1.0}))           # v5; FakeWorkers answer plan_version=5
    run(core)
    assert pokes == []
    core.set_plan(replace_version(plan({"det-a": 1.0}), 4))
    run(core)
    assert pokes == [1]


def replace_version(p, v):
    from dataclasses import replace

    return replace(p, version=v)


class SequenceRng:
    def __init__(self, us):
        self.us = list(us)
        self.i = 0

    def random(self):
        self.i += 1
        return self.us[self.i - 1]


def test_the_simulator_and_a_router_route_the_same_queries_to_the_same_workers():
    """Same plan (made by the planner for the traffic-analysis profile), same arrivals,
    same uniform numbers: the router's choices are the simulator's, while the measured
    rates move MostAccurateFirst between its regimes."""
    import numpy as np

    from services.planner import load_profile
    from services.sim.engine import SimConfig, _Sim
    from services.sim.policies import make_policy

    profile = load_profile("profiles/traffic_analysis.json")
    policy = make_policy("ours", profile, 20)
    sim = _Sim(profile, np.zeros(0), policy, SimConfig(n_workers=20, seed=0))
    sim.root_est.observe("frontdoor", 0.0, -1.0)
    sim.root_est.observe("frontdoor", 300.0, 0.0)
    sim.root_est.update(0.0)
    decision = policy.decide(sim._observation(0.0))
    sim.apply(decision, 0.0, initial=True)
    plan = decision.plan
    task = "car_classification"
    spec = parse_spec({"name": profile.name, "slo_ms": profile.slo_ms, "tasks": [
        {"name": t.name, "children": list(t.children),
         "variants": [{"name": v.name, "model": "m", "processor": "k"} for v in t.variants]}
        for t in profile.tasks]})
    ti = sim.tasks.index(task)
    path = max((p for p in plan.routing[task] if p != ANY_PATH), key=lambda p: len(plan.routing[task][p]))
    rng = np.random.default_rng(5)
    # bursts of k queries at times spread over 6 s, the rate first low, then high
    events = [(t, int(k)) for t, k in zip(np.sort(rng.uniform(0, 6, 120)), rng.integers(1, 40, 120))]
    us = rng.random(sum(k for _, k in events)).tolist()
    now = [0.0]
    router = RouterCore(spec, task, RecordingWorkers(plan), FakeChildren(), rng=SequenceRng(us),
                        clock=lambda: now[0])
    router.reroute = False
    router.set_plan(plan)
    u_iter = iter(us)
    tick = 0
    chosen_before, chosen_after = set(), set()
    for t, k in events:
        while tick + 1 <= t:                 # the simulator's control ticks
            tick += 1
            sim.stages[ti].advance(float(tick))
        want = sim.stages[ti].split(path, k, lambda: next(u_iter))
        now[0] = t
        router.workers.calls.clear()
        asyncio.run(router.route("r", t + 10, [pb.Query(query_id=f"q{i}", payload=b"x") for i in range(k)], path))
        assert router.workers.counts() == want, (t, k)
        (chosen_before if t < 1.0 else chosen_after).update(want)
    # before the first rate tick: the plan's own split over b0 and b3 workers; after it, the
    # measured rate is a few % of the planned one and MostAccurateFirst keeps to the b3 ones
    variant = {w: a.variant for w, a in plan.workers.items()}
    assert {variant[w] for w in chosen_before} == {"efficientnet-b0", "efficientnet-b3"}
    assert {variant[w] for w in chosen_after} == {"efficientnet-b3"}


class RecordingWorkers:
    def __init__(self, plan):
        self.by_address = {w.address: w.worker_id for w in plan.workers.values()}
        self.calls = []

    async def infer(self, address, request, timeout_s):
        self.calls.append((self.by_address[address], len(request.queries)))
        return pb.InferBatchResponse(results=[pb.QueryResult(query_id=q.query_id, status=pb.OK)
                                              for q in request.queries])

    def counts(self):
        out = {}
        for w, n in self.calls:
            out[w] = out.get(w, 0) + n
        return out


# -- hung and dead workers (services/policy/health.py) ---------------------------------

def health_config():
    from services.policy.health import HealthConfig

    return HealthConfig(failures_to_open=2, cooldown_s=1.0, margin_s=0.1, margin_factor=2.0, suspect_after=0.5)


class HangingWorkers(FakeWorkers):
    """Workers at ``hung`` addresses never answer: the call ends at its timeout, as a gRPC
    call to a stopped process does (DEADLINE_EXCEEDED -> DROPPED_DEADLINE)."""

    def __init__(self, hung=(), **kw):
        super().__init__(regions=0, **kw)
        self.hung = set(hung)

    async def infer(self, address, request, timeout_s):
        if address in self.hung:
            self.calls.append((address, [q.query_id for q in request.queries], timeout_s))
            await asyncio.sleep(timeout_s)
            raise CallFailed(pb.DROPPED_DEADLINE, f"worker {address}: DEADLINE_EXCEEDED")
        return await super().infer(address, request, timeout_s)


def timed_plan(weights):
    """``plan(weights)`` with latency figures: a batch of 2 takes 10 ms on d1 and d2."""
    from dataclasses import replace

    return replace(plan(weights), latency_ms={"det": {"d1": {2: 10.0}, "d2": {2: 10.0}}})


def make_healthy(workers, weights, clock=None, **kw):
    core = RouterCore(SPEC, "det", workers, FakeChildren(), rng=random.Random(0), health=health_config(),
                      **({"clock": clock} if clock else {}), **kw)
    core.reroute = False
    core.set_plan(timed_plan(weights))
    return core


def test_a_hung_workers_call_is_abandoned_at_its_expected_end_plus_margin_and_retried_once():
    """det-a hangs. Its call's timeout is 10 ms + max(0.1, 2 x 10 ms) = 0.11 s, not the 10 s
    left; the group then goes to det-b (another variant: the only other replica) and is
    answered. After two such failures det-a's breaker is open: det-b gets the next
    request directly."""
    workers = HangingWorkers(hung={"a:1"})
    core = make_healthy(workers, {"det-a": 1.0})
    for _ in range(2):
        workers.calls.clear()
        [r] = run(core, deadline_in=10.0)
        assert r.status == pb.OK and r.variant == "d2"
        assert [c[0] for c in workers.calls] == ["a:1", "b:1"]
        assert workers.calls[0][2] == pytest.approx(0.11)         # 0.01 + max(0.1, 0.02): no answer learnt
        assert workers.calls[1][2] > 9.0                          # the retry: the rest of the budget
    assert core.health.state("det-a", core.clock()).value == "open"
    workers.calls.clear()
    [r] = run(core, deadline_in=10.0)
    assert r.status == pb.OK and [c[0] for c in workers.calls] == ["b:1"]


def test_a_second_hung_replica_is_not_given_a_short_timeout_the_group_is_retried_once():
    workers = HangingWorkers(hung={"a:1", "b:1"})
    core = make_healthy(workers, {"det-a": 1.0})
    [r] = run(core, deadline_in=0.6)
    assert r.status == pb.DROPPED_DEADLINE                       # one terminal answer
    assert [c[0] for c in workers.calls] == ["a:1", "b:1"]
    assert workers.calls[0][2] == pytest.approx(0.11) and workers.calls[1][2] > 0.4


def test_new_traffic_avoids_a_worker_whose_call_is_well_past_its_expected_end():
    """While det-a holds a call 0.06 s past its expected end (half its margin), a new
    request goes to det-b at once, before the first call is abandoned."""
    workers = HangingWorkers(hung={"a:1"})
    core = make_healthy(workers, {"det-a": 1.0})

    async def scenario():
        first = asyncio.create_task(core.route("r1", core.clock() + 10, [pb.Query(query_id="x", payload=b"p")], ""))
        await asyncio.sleep(0.085)          # 0.01 expected + 0.5 x 0.1 margin = 0.06 < 0.085 < 0.11
        assert core.health.suspect("det-a", core.clock())
        second = await core.route("r2", core.clock() + 10, [pb.Query(query_id="y", payload=b"p")], "")
        return await first, second

    first, second = asyncio.run(scenario())
    assert [r.status for r in first + second] == [pb.OK, pb.OK]
    assert [(c[0], c[1]) for c in workers.calls] == [("a:1", ["x"]), ("b:1", ["y"]), ("b:1", ["x"])]


def test_without_another_replica_a_call_gets_the_whole_budget():
    from dataclasses import replace

    workers = FakeWorkers(regions=0)
    core = make_healthy(workers, {"det-a": 1.0})
    base = timed_plan({"det-a": 1.0})
    core.set_plan(replace(base, workers={k: v for k, v in base.workers.items() if k != "det-b"}))
    run(core, deadline_in=5.0)
    assert workers.calls[-1][2] > 4.5
    core.set_plan(base)
    run(core, deadline_in=5.0)
    assert 0.11 <= workers.calls[-1][2] < 1.0   # 0.01 + 0.1 (or more: the learnt round trip)
    run(core, deadline_in=0.2)            # 2 x 0.11 > 0.2: no room for a second try
    assert workers.calls[-1][2] > 0.15


def test_a_dead_worker_opens_its_breaker_and_gets_one_probe_after_the_cool_down():
    """det-a answers UNAVAILABLE (a killed process): each request is retried on det-b; after
    two, det-a gets no traffic until its cool-down ends, then one probe, which succeeds
    once det-a is back."""
    now = [1000.0]
    workers = FakeWorkers(regions=0, fail={"a:1": CallFailed(pb.UNAVAILABLE, "connection refused")})
    core = make_healthy(workers, {"det-a": 1.0}, clock=lambda: now[0])

    def addresses():
        workers.calls.clear()
        [r] = run(core)
        assert r.status == pb.OK
        return [c[0] for c in workers.calls]

    assert addresses() == ["a:1", "b:1"]
    assert addresses() == ["a:1", "b:1"]          # the second failure opens the breaker
    assert addresses() == ["b:1"]
    now[0] += 1.1
    assert addresses() == ["a:1", "b:1"]          # half-open: a probe, failed (cool-down now 2 s)
    now[0] += 1.1
    assert addresses() == ["b:1"]
    now[0] += 1.0
    del workers.fail["a:1"]                       # det-a is back
    assert addresses() == ["a:1"]
    assert addresses() == ["a:1"]


def test_a_calls_timeout_follows_the_workers_learnt_round_trip_up_at_once():
    """A worker whose calls take 0.3 s though its batches take 10 ms (queueing, transfer):
    the next call's timeout is 0.3 s + max(0.1, 2 x 0.3 s), not 0.11 s."""

    class Slow(FakeWorkers):
        async def infer(self, address, request, timeout_s):
            await asyncio.sleep(0.3)
            return await super().infer(address, request, timeout_s)

    workers = Slow(regions=0)
    core = make_healthy(workers, {"det-a": 1.0})
    run(core, deadline_in=10.0)
    assert workers.calls[0][2] == pytest.approx(0.11)
    run(core, deadline_in=10.0)
    assert workers.calls[1][2] >= 0.9                             # 0.3 + 0.6


def test_a_call_abandoned_for_a_replica_that_then_failed_is_sent_again_not_dropped():
    """det-a answers in 0.3 s. Its call gets the short timeout (0.11 s) because det-b is
    usable when it is sent; while it runs, det-b's breaker opens. The abandoned group has no
    other replica then: it goes to det-a again with the whole remaining budget and is
    answered, instead of being dropped with most of its budget left."""
    holder = {}

    class SlowA(FakeWorkers):
        async def infer(self, address, request, timeout_s):
            if address != "a:1":
                return await super().infer(address, request, timeout_s)
            self.calls.append((address, [q.query_id for q in request.queries], timeout_s))
            core, now = holder["core"], holder["core"].clock()
            for _ in range(2):                        # meanwhile det-b fails twice: open
                core.health.call_ended(core.health.call_started("det-b", now, 0.01), now, True)
            await asyncio.sleep(min(timeout_s, 0.3))
            if timeout_s < 0.3:
                raise CallFailed(pb.DROPPED_DEADLINE, f"worker {address}: DEADLINE_EXCEEDED")
            self.calls.pop()
            return await super().infer(address, request, timeout_s)

    workers = SlowA(regions=0)
    core = holder["core"] = make_healthy(workers, {"det-a": 1.0})
    [r] = run(core, deadline_in=5.0)
    assert r.status == pb.OK and r.variant == "d1"
    assert [c[0] for c in workers.calls] == ["a:1", "a:1"]
    assert workers.calls[0][2] == pytest.approx(0.11) and workers.calls[1][2] > 4.0
