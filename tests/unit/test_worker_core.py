"""WorkerCore with a hand-written fake processor (no ONNX, no sockets)."""
import asyncio
import threading
import time

import pytest

from services.common.errors import InvalidInput, Unavailable
from services.common.processing import ItemResult, Prepared, Processor, RegionOut
from services.common.spec import parse_spec
from services.worker.core import ModelHost, Status, WorkerCore

SPEC = parse_spec({"name": "p", "slo_ms": 1000, "tasks": [{"name": "t", "variants": [
    {"name": "v1", "model": "m", "processor": "fake"}, {"name": "v2", "model": "m", "processor": "fake"}]}]})


class FakeProcessor(Processor):
    def __init__(self, variant, delay_s=0.01):
        super().__init__(variant, ".")
        self.delay_s = delay_s
        self.batches = []
        self.threads = set()

    def prepare(self, payload):
        self.prepared = getattr(self, "prepared", 0) + 1
        if payload == b"bad":
            raise InvalidInput("not an image")
        return Prepared(payload)

    def run_batch(self, session, items):
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(items))
        time.sleep(self.delay_s * len(items))
        return [ItemResult(regions=tuple(RegionOut(text=self.variant.name) for _ in range(len(p.data))),
                           child_payloads=()) for p in items]


def make_core(load_delay_s=0.0, delay_s=0.01):
    procs = {}

    def loader(variant):
        time.sleep(load_delay_s)
        procs[variant.name] = FakeProcessor(variant, delay_s)
        return ModelHost(variant, procs[variant.name], session=None, providers=["FakeProvider"])

    return WorkerCore("w", SPEC.task("t"), ".", loader=loader), procs


def test_batches_up_to_the_plan_batch_size_off_the_event_loop():
    async def scenario():
        core, procs = make_core()
        core.start()
        await core.apply("v1", 4, plan_version=1)
        queries = [(f"q{i}", b"xx") for i in range(10)]
        outs = await core.submit(queries, time.time() + 10)
        more = await core.submit([(f"m{i}", b"xx") for i in range(8)], time.time() + 10)
        await core.stop()
        return core, procs["v1"], outs + more

    core, proc, all_outs = asyncio.run(scenario())
    outs = all_outs[:10]
    assert [o.query_id for o in outs] == [f"q{i}" for i in range(10)]
    assert all(o.status is Status.OK and len(o.result.regions) == 2 for o in outs)
    assert proc.batches == [4, 4, 2, 4, 4]
    assert all(name.startswith("w-infer") for name in proc.threads)
    s = core.stats()
    assert s["completed"] == 18 and s["providers"] == ["FakeProvider"]
    timings = core.take_timings()
    # the first REPORT_AFTER_BATCHES (3) batches of a new variant are not reported
    assert sum(t.count for t in timings) == 2 and {t.batch_size for t in timings} == {4}
    assert sum(t.items for t in timings) == 8 and sum(t.regions for t in timings) == 16   # fan-out 2
    assert core.take_timings() == []          # reported once


def test_invalid_payload_and_no_model():
    async def scenario():
        core, _ = make_core()
        core.start()
        with pytest.raises(Unavailable):
            await core.submit([("q", b"x")], time.time() + 1)
        await core.apply("v1", 2, 1)
        outs = await core.submit([("good", b"x"), ("bad", b"bad")], time.time() + 5)
        await core.stop()
        return outs

    good, bad = asyncio.run(scenario())
    assert good.status is Status.OK
    assert bad.status is Status.INVALID and "not an image" in bad.message


def test_queries_that_cannot_make_their_deadline_are_dropped():
    async def scenario():
        core, procs = make_core(delay_s=0.05)
        core.start()
        await core.apply("v1", 1, 1)
        # four queries of 50 ms each, 120 ms budget: the first two fit, the rest are dropped
        outs = await core.submit([(f"q{i}", b"x") for i in range(4)], time.time() + 0.12)
        await core.stop()
        return core, outs

    core, outs = asyncio.run(scenario())
    statuses = [o.status for o in outs]
    assert statuses.count(Status.DROPPED_DEADLINE) >= 1 and statuses[0] is Status.OK
    assert core.stats()["dropped"] == statuses.count(Status.DROPPED_DEADLINE)


def test_swap_serves_queued_queries_on_the_old_model_and_new_ones_on_the_new():
    async def scenario():
        core, procs = make_core(load_delay_s=0.1, delay_s=0.02)
        core.start()
        await core.apply("v1", 2, 1)
        before = asyncio.create_task(core.submit([(f"a{i}", b"x") for i in range(8)], time.time() + 10))
        await asyncio.sleep(0.01)
        swap = asyncio.create_task(core.apply("v2", 2, 2))
        await asyncio.sleep(0.02)
        assert core.state.value == "swapping"
        during = await core.submit([("mid", b"x")], time.time() + 10)   # still v1 while loading
        await swap
        after = await core.submit([("b0", b"x")], time.time() + 10)
        outs = await before
        await core.stop()
        return core, outs, during, after

    core, outs, during, after = asyncio.run(scenario())
    assert all(o.status is Status.OK and o.variant == "v1" for o in outs)
    assert during[0].status is Status.OK and during[0].variant == "v1"
    assert after[0].variant == "v2" and core.stats()["variant"] == "v2" and core.plan_version == 2


def test_a_full_queue_sheds_the_whole_submission_before_queueing_anything():
    from services.common.errors import Shed

    async def scenario():
        core, procs = make_core(delay_s=0.05)
        core.max_queue = 4
        core.start()
        await core.apply("v1", 1, 1)
        first = asyncio.create_task(core.submit([(f"a{i}", b"x") for i in range(4)], time.time() + 10))
        await asyncio.sleep(0.02)   # the first batch runs, three stay queued
        with pytest.raises(Shed, match="queue full"):
            await core.submit([("b0", b"x"), ("b1", b"x")], time.time() + 10)   # 3 + 2 > 4
        ok = await core.submit([("c0", b"x")], time.time() + 10)               # 3 + 1 fits
        outs = await first
        await core.stop()
        return core, outs, ok

    core, outs, ok = asyncio.run(scenario())
    assert all(o.status is Status.OK for o in outs + ok)
    assert core.stats()["shed"] == 2


def test_a_query_that_cannot_make_it_is_dropped_before_preprocessing():
    async def scenario():
        core, procs = make_core(delay_s=0.05)
        core.start()
        await core.apply("v1", 1, 1, latency_ms={1: 50.0})   # the plan says 50 ms per query
        outs = await core.submit([("late", b"x")], time.time() + 0.03)        # 30 ms left
        await core.stop()
        return outs, procs["v1"]

    outs, proc = asyncio.run(scenario())
    assert outs[0].status is Status.DROPPED_DEADLINE
    assert getattr(proc, "prepared", 0) == 0 and proc.batches == []


def test_the_plan_figures_seed_the_batch_time_estimate():
    async def scenario():
        core, _ = make_core()
        await core.apply("v1", 4, 1, latency_ms={1: 20.0, 4: 60.0})
        return core.host.estimator

    est = asyncio.run(scenario())
    assert est(1) == pytest.approx(0.020) and est(2) == pytest.approx(0.060) and est(4) == pytest.approx(0.060)


def test_a_dead_batch_loop_is_restarted_and_nothing_it_held_hangs():
    async def scenario():
        core, procs = make_core()
        core.start()
        await core.apply("v1", 2, 1)
        real = core.queue.take_batch
        calls = {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected bug in the batching step")
            return real(*a, **kw)

        core.queue.take_batch = flaky
        first = await asyncio.wait_for(core.submit([("a", b"x")], time.time() + 10), 5)
        second = await asyncio.wait_for(core.submit([("b", b"x")], time.time() + 10), 5)
        restarts = core.loop_restarts
        await core.stop()
        return first, second, restarts

    first, second, restarts = asyncio.run(scenario())
    assert restarts == 1
    assert first[0].status is Status.OK      # still queued when the loop died: served after the restart
    assert second[0].status is Status.OK


def test_queries_held_by_a_crashing_batch_loop_get_internal_not_a_hang():
    async def scenario():
        core, procs = make_core()
        core.start()
        await core.apply("v1", 2, 1)
        real = core.batches._run_group
        calls = {"n": 0}

        async def crash_once(loop, items, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected bug after the batch was taken")
            return await real(loop, items, **kwargs)

        core.batches._run_group = crash_once
        held = await asyncio.wait_for(core.submit([("a", b"x"), ("b", b"x")], time.time() + 10), 5)
        after = await asyncio.wait_for(core.submit([("c", b"x")], time.time() + 10), 5)
        await core.stop()
        return held, after, core.loop_restarts

    held, after, restarts = asyncio.run(scenario())
    assert [o.status for o in held] == [Status.INTERNAL, Status.INTERNAL] and restarts == 1
    assert after[0].status is Status.OK


def test_a_request_routed_with_a_newer_plan_makes_the_worker_re_read_it():
    from services.gen import pipeserve_pb2 as pb
    from services.worker.servicer import WorkerServicer

    class Ctx:
        async def abort(self, code, details):
            raise AssertionError(details)

    seen = []

    async def scenario():
        core, _ = make_core()
        core.start()
        await core.apply("v1", 2, plan_version=3)
        servicer = WorkerServicer(core, seen.append)
        for version in (3, 2, 5):
            await servicer.InferBatch(pb.InferBatchRequest(
                task="t", deadline_unix_s=time.time() + 5, plan_version=version,
                queries=[pb.Query(query_id="q", payload=b"x")]), Ctx())
        await core.stop()

    asyncio.run(scenario())
    assert seen == [5]


def test_a_loaded_model_is_warmed_up_before_it_serves():
    class Warm(FakeProcessor):
        def warmup_payload(self):
            return b"warm"

    proc = Warm(SPEC.task("t").variant("v1"))
    ModelHost(SPEC.task("t").variant("v1"), proc, session=None, providers=[]).warm_up()
    assert proc.batches == [1, 1]
    cold = FakeProcessor(SPEC.task("t").variant("v1"))
    ModelHost(SPEC.task("t").variant("v1"), cold, session=None, providers=[]).warm_up()
    assert cold.batches == []                 # no warm-up input: nothing run


# -- the elastic pool: moves between tasks, parking ----------------------------------

POOL_SPEC = parse_spec({"name": "p", "slo_ms": 1000, "tasks": [
    {"name": "a", "children": ["b"], "variants": [{"name": "a1", "model": "m", "processor": "fake"}]},
    {"name": "b", "variants": [{"name": "b1", "model": "m", "processor": "fake"},
                               {"name": "b2", "model": "m", "processor": "fake"}]}]})


def make_pool_core(load_delay_s=0.0, delay_s=0.01, linger_s=0.2):
    procs, loads = {}, []

    def loader(variant):
        loads.append(variant.name)
        time.sleep(load_delay_s)
        procs[variant.name] = FakeProcessor(variant, delay_s)
        return ModelHost(variant, procs[variant.name], session=None, providers=["FakeProvider"])

    core = WorkerCore("w", None, ".", loader=loader, linger_s=linger_s,
                      tasks={t.name: t for t in POOL_SPEC.tasks})
    return core, procs, loads


def test_a_pool_worker_moves_between_tasks_without_failing_queued_or_stale_routed_queries():
    async def scenario():
        core, procs, _ = make_pool_core(delay_s=0.02, linger_s=0.3)
        core.start()
        assert core.stats()["task"] == "" and core.stats()["state"] == "idle"
        await core.apply("a1", 1, plan_version=1, task="a")
        queued = asyncio.ensure_future(core.submit([(f"q{i}", b"x") for i in range(5)], time.time() + 10,
                                                   task="a"))
        await asyncio.sleep(0.01)
        await core.apply("b1", 2, plan_version=2, task="b")        # moved while queries of a are queued
        assert core.task_name == "b" and core.stats()["task"] == "b"
        stale = await core.submit([("late", b"x")], time.time() + 10, task="a")   # a router on plan 1
        fresh = await core.submit([("new", b"x")], time.time() + 10, task="b")
        first = await queued
        await asyncio.sleep(0.35)
        released = core.release_lingering()
        with pytest.raises(Unavailable, match="task 'a'"):
            await core.submit([("too-late", b"x")], time.time() + 10, task="a")
        await core.stop()
        return first, stale, fresh, released

    first, stale, fresh, released = asyncio.run(scenario())
    assert all(o.status is Status.OK and o.variant == "a1" for o in first)
    assert stale[0].status is Status.OK and stale[0].variant == "a1"
    assert fresh[0].status is Status.OK and fresh[0].variant == "b1"
    assert released == ["a"]


def test_a_worker_the_plan_does_not_need_parks_frees_its_model_and_comes_back():
    async def scenario():
        core, procs, loads = make_pool_core(linger_s=0.1)
        core.start()
        await core.apply("b2", 1, plan_version=1, task="b")
        assert await core.park(plan_version=2) is True
        s = core.stats()
        assert s["state"] == "parked" and s["task"] == "" and s["variant"] == ""
        stale = await core.submit([("late", b"x")], time.time() + 10, task="b")   # within the linger
        assert core.release_lingering(now=time.monotonic() + 1.0) == ["b"]
        assert core._host_for("b") is None
        with pytest.raises(Unavailable, match="parked"):
            await core.submit([("q", b"x")], time.time() + 10, task="b")
        assert await core.park(plan_version=3) is False       # parking twice is a no-op
        await core.apply("a1", 1, plan_version=4, task="a")   # demand is back
        back = await core.submit([("q2", b"x")], time.time() + 10, task="a")
        stats = core.stats()
        await core.stop()
        return stale, back, loads, stats

    stale, back, loads, stats = asyncio.run(scenario())
    assert stale[0].status is Status.OK and stale[0].variant == "b2"
    assert back[0].status is Status.OK and back[0].variant == "a1"
    assert loads == ["b2", "a1"] and stats["loads"] == 2 and stats["state"] == "serving"


def test_queries_sent_while_the_planned_model_loads_wait_for_it():
    async def scenario():
        core, _, _ = make_pool_core(load_delay_s=0.3)
        core.start()
        load = asyncio.ensure_future(core.apply("a1", 1, plan_version=1, task="a"))
        await asyncio.sleep(0.05)
        assert core.stats()["state"] == "loading"
        out = await core.submit([("q", b"x")], time.time() + 10, task="a")
        await load
        # a query whose deadline ends before the load does fails over (UNAVAILABLE), not hangs
        core2, _, _ = make_pool_core(load_delay_s=0.5)
        core2.start()
        load2 = asyncio.ensure_future(core2.apply("a1", 1, plan_version=1, task="a"))
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable):
            await core2.submit([("q", b"x")], time.time() + 0.1, task="a")
        await load2
        await core.stop()
        await core2.stop()
        return out

    out = asyncio.run(scenario())
    assert out[0].status is Status.OK and out[0].variant == "a1"


def test_a_pool_worker_refuses_a_task_outside_its_set_and_a_bound_worker_stays_on_its_task():
    async def scenario():
        core, _, _ = make_pool_core()
        with pytest.raises(ValueError, match="may not serve task 'zzz'"):
            await core.apply("a1", 1, plan_version=1, task="zzz")
        bound, _ = make_core()
        bound.start()
        await bound.apply("v1", 1, plan_version=1)
        await bound.park(plan_version=2)
        s = bound.stats()
        await bound.apply("v2", 1, plan_version=3)
        await bound.stop()
        return s, bound.task_name

    s, task = asyncio.run(scenario())
    assert s["state"] == "parked" and s["task"] == "t"   # a bound worker keeps its task while parked
    assert task == "t"


def test_timings_name_their_task():
    async def scenario():
        core, _, _ = make_pool_core()
        core.start()
        await core.apply("a1", 1, plan_version=1, task="a")
        for i in range(5):
            await core.submit([(f"q{i}", b"x")], time.time() + 10, task="a")
        await core.stop()
        return core.take_timings()

    timings = asyncio.run(scenario())
    assert timings and all(t.task == "a" and t.variant == "a1" for t in timings)


async def _released_model_alive(submit) -> bool:
    """Whether the model of a pool worker that ran ``submit(core)`` and then parked is
    still referenced anywhere once its linger ended and the batch loop is idle."""
    import gc
    import weakref

    core, _, _ = make_pool_core(linger_s=0.0)
    core.start()
    await core.apply("b1", 2, plan_version=1, task="b")
    await submit(core)
    ref = weakref.ref(core.host)
    await core.park(plan_version=2)
    core.release_lingering(now=time.monotonic() + 1)
    await asyncio.sleep(0.05)      # the batch loop is idle, waiting for work
    gc.collect()
    alive = ref() is not None
    await core.stop()
    return alive


def test_a_released_model_is_no_longer_referenced_anywhere():
    async def one_by_one(core):
        for i in range(3):
            await core.submit([(f"q{i}", b"x")], time.time() + 10, task="b")

    assert asyncio.run(_released_model_alive(one_by_one)) is False


def test_a_released_model_is_not_held_by_a_batch_that_was_queued_ahead():
    async def four_at_once(core):
        await core.submit([(f"q{i}", b"x") for i in range(4)], time.time() + 10, task="b")
        assert core.counters["queued_ahead"] == 1   # the last batch ran queued ahead

    assert asyncio.run(_released_model_alive(four_at_once)) is False


# -- the burst variant: spilling a batch when the queue says the plan is overrun ------

class VariantInputProcessor(FakeProcessor):
    """Prepares an input only its own variant can run (as OCR det variants differ in
    input size): a batch prepared by another variant's processor fails."""

    def prepare(self, payload):
        self.prepared = getattr(self, "prepared", 0) + 1
        return Prepared((self.variant.name, payload))

    def run_batch(self, session, items):
        wrong = [p.data[0] for p in items if p.data[0] != self.variant.name]
        if wrong:
            raise ValueError(f"{self.variant.name} got inputs prepared for {wrong}")
        self.batches.append(len(items))
        time.sleep(self.delay_s * len(items))
        return [ItemResult(regions=(RegionOut(text=f"{self.variant.name}:{p.data[1].decode()}"),),
                           child_payloads=()) for p in items]


PLANNED_MS = {1: 1000.0, 2: 1000.0}      # the plan says a batch of 2 on v1 takes 1 s
BURST_MS = {1: 10.0, 4: 20.0, 8: 1200.0}   # v2: 4 fit in 1 s, 8 do not


def make_burst_core(burst=True):
    procs = {}

    def loader(variant):
        procs[variant.name] = VariantInputProcessor(variant, delay_s=0.001)
        return ModelHost(variant, procs[variant.name], session=None, providers=["FakeProvider"])

    return WorkerCore("w", SPEC.task("t"), ".", loader=loader, burst=burst), procs


async def _burst_loaded(core):
    for _ in range(200):
        if core.burst is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the burst variant did not load")


async def _run_queued(core, n, budget_s, burst="v2"):
    """Plan v1 (batch 2) with ``burst``, queue ``n`` queries due in ``budget_s`` while the
    batch loop is stopped, then start it and wait for every outcome."""
    await core.apply("v1", 2, plan_version=1, latency_ms=PLANNED_MS)
    core.set_burst("t", burst, BURST_MS if burst else None)
    if burst == "v2" and core.burst_enabled:
        await _burst_loaded(core)
    else:
        await asyncio.sleep(0.05)    # time enough for a (wrong) load to happen
    outs = asyncio.ensure_future(core.submit([(f"q{i}", b"%d" % i) for i in range(n)], time.time() + budget_s))
    while core.queue.queued < n:
        await asyncio.sleep(0.01)
    core.start()
    done = await asyncio.wait_for(outs, 20)
    await core.stop()
    return done


def test_an_overrun_queue_spills_batches_to_the_burst_variant_re_prepared_and_labelled():
    async def scenario():
        core, procs = make_burst_core()
        # 40 queued, due in 10 s: at 2 per 1 s they would take 20 s, past half the span of
        # their deadlines (all 10 s): overrun until 16 are left (8 batches = 8 s < 10 s;
        # 2 s of margin for a busy machine)
        outs = await _run_queued(core, 40, budget_s=10.0)
        return core, procs, outs, core.take_timings()

    core, procs, outs, timings = asyncio.run(scenario())
    assert all(o.status is Status.OK for o in outs)
    spilled = [o for o in outs if o.variant == "v2"]
    # spills at 40, 36, 32, 28, 24, 20 queued (ceil(20 / 2) * 1 s = 10 s > 10 s - elapsed): 6 batches of 4
    assert len(spilled) == 24 and procs["v2"].batches == [4] * 6 and core.counters["spilled"] == 6
    assert all(o.batch_size == 4 for o in spilled)
    # re-prepared by v2's processor from the raw payload (v2's run_batch refuses v1's inputs)
    assert procs["v2"].prepared == 24
    assert all(o.result.regions[0].text == f"v2:{o.query_id[1:]}" for o in spilled)
    rest = [o for o in outs if o.variant == "v1"]
    assert len(rest) == 16 and procs["v1"].batches == [2] * 8
    assert all(o.result.regions[0].text.startswith("v1:") for o in rest)
    # timings under each variant's own name (the first 3 batches of each host unreported)
    by_variant = {(t.variant, t.batch_size): t.count for t in timings}
    assert by_variant == {("v2", 4): 3, ("v1", 2): 5}
    # each estimator learned from its own batches only: v1 never saw a batch of 4
    assert 4 not in core.host.estimator.by_size and core.host.batches == 8


def test_a_queue_that_is_not_overrun_never_spills():
    async def scenario():
        core, procs = make_burst_core()
        # 40 queued due in 30 s: 20 batches of 1 s end at 20 s, before 30 s: not overrun
        outs = await _run_queued(core, 40, budget_s=30.0)
        return core, procs, outs

    core, procs, outs = asyncio.run(scenario())
    assert core.burst is not None and core.counters["spilled"] == 0   # loaded, never used
    assert all(o.status is Status.OK and o.variant == "v1" for o in outs)
    assert procs["v2"].batches == [] and getattr(procs["v2"], "prepared", 0) == 0


def test_without_a_burst_model_an_overrun_queue_runs_on_the_planned_variant():
    async def scenario():
        results = []
        for core, procs, burst in [(*make_burst_core(burst=False), "v2"),   # --burst off
                                   (*make_burst_core(), None),              # the plan names none
                                   (*make_burst_core(), "v1")]:             # it names the planned one
            outs = await _run_queued(core, 40, budget_s=10.0, burst=burst)
            results.append((core, procs, outs))
        return results

    for core, procs, outs in asyncio.run(scenario()):
        assert core.burst is None and core.counters["spilled"] == 0 and "v2" not in procs
        assert all(o.variant == "v1" for o in outs)
        assert all(o.status in (Status.OK, Status.DROPPED_DEADLINE) for o in outs)
        assert core.counters["errors"] == 0 and core.loop_restarts == 0


def test_the_burst_model_loads_after_the_planned_one_and_is_released_when_not_named():
    import gc
    import weakref

    async def scenario():
        core, procs = make_burst_core()
        core.set_burst("t", "v2", BURST_MS)          # no planned model yet: nothing loads
        await asyncio.sleep(0.05)
        assert core.burst is None and "v2" not in procs
        await core.apply("v1", 2, plan_version=1, latency_ms=PLANNED_MS)
        core.set_burst("t", "v2", BURST_MS)
        await _burst_loaded(core)
        ref = weakref.ref(core.burst)
        assert core.burst.estimator(4) == pytest.approx(0.020)   # seeded from the plan's figures
        core.set_burst("t", "v2", BURST_MS)          # the next plan names it again: kept
        assert ref() is core.burst
        core.set_burst("t", None, None)              # a plan that names none: released
        gc.collect()
        released = core.burst is None and ref() is None
        core.set_burst("t", "v2", BURST_MS)
        await _burst_loaded(core)
        await core.park(plan_version=2)              # parking releases it too
        parked = core.burst is None
        await core.stop()
        return released, parked

    released, parked = asyncio.run(scenario())
    assert released and parked


def test_a_pool_worker_moving_to_another_task_releases_its_burst_model():
    async def scenario():
        core, procs, loads = make_pool_core()
        await core.apply("b1", 2, plan_version=1, task="b")
        core.set_burst("b", "b2", {1: 5.0})
        await _burst_loaded(core)
        await core.apply("a1", 1, plan_version=2, task="a")
        moved = core.burst
        core.set_burst("a", None, None)
        await core.stop()
        return moved, loads

    moved, loads = asyncio.run(scenario())
    assert moved is None and loads == ["b1", "b2", "a1"]


# -- a full batch waiting is queued behind the running one (BatchLoop._prefetch) ------

def test_a_full_batch_waiting_is_queued_behind_the_running_one_and_timed_from_its_own_start():
    async def scenario():
        core, procs = make_core(delay_s=0.1)    # 200 ms per batch of 2
        core.start()
        await core.apply("v1", 2, 1)
        outs = await core.submit([(f"q{i}", b"x") for i in range(6)], time.time() + 10)
        await core.stop()
        return core, procs["v1"], outs

    core, proc, outs = asyncio.run(scenario())
    assert [o.status for o in outs] == [Status.OK] * 6
    assert proc.batches == [2, 2, 2]
    assert core.counters["queued_ahead"] == 2       # the 2nd and 3rd batches were handed over early
    by_batch = [outs[0], outs[2], outs[4]]
    # each batch's service time is its own run (200 ms), not also the wait behind the one
    # before it (400 ms)
    assert all(190 <= o.service_ms < 300 for o in by_batch), [o.service_ms for o in by_batch]
    # ... and its queue time runs until the thread took it up: one and two batches' worth
    assert by_batch[1].queue_ms >= 190 and by_batch[2].queue_ms >= 390, [o.queue_ms for o in by_batch]


def test_a_partial_batch_is_not_taken_early_arrivals_while_the_model_runs_fill_it():
    async def scenario():
        core, procs = make_core(delay_s=0.1)
        core.start()
        await core.apply("v1", 4, 1)
        first = asyncio.create_task(core.submit([(f"a{i}", b"x") for i in range(4)], time.time() + 10))
        await asyncio.sleep(0.02)                   # the first batch (400 ms) runs
        second = asyncio.create_task(core.submit([("b0", b"x"), ("b1", b"x")], time.time() + 10))
        await asyncio.sleep(0.02)
        assert core.counters["queued_ahead"] == 0   # 2 of 4 waiting: not handed over early
        third = asyncio.create_task(core.submit([("c0", b"x"), ("c1", b"x")], time.time() + 10))
        outs = await first + await second + await third
        await core.stop()
        return core, procs["v1"], outs

    core, proc, outs = asyncio.run(scenario())
    assert [o.status for o in outs] == [Status.OK] * 8
    assert proc.batches == [4, 4]
    assert core.counters["queued_ahead"] == 1       # once full, the second batch was


def test_a_batch_queued_ahead_drops_what_cannot_make_it_after_the_running_batch():
    async def scenario():
        core, procs = make_core(delay_s=0.3)
        core.start()
        await core.apply("v1", 1, 1, latency_ms={1: 300.0})
        first = asyncio.create_task(core.submit([("a", b"x")], time.time() + 10))
        await asyncio.sleep(0.02)                   # "a" runs until ~300 ms
        # 450 ms left: alone now it would make it (300 ms), after "a" it cannot (~580 ms)
        late = await core.submit([("late", b"x")], time.time() + 0.45)
        outs = await first + late
        await core.stop()
        return procs["v1"], outs

    proc, outs = asyncio.run(scenario())
    assert [o.status for o in outs] == [Status.OK, Status.DROPPED_DEADLINE]
    assert proc.batches == [1]


class CountingSession:
    """A model: each ``run`` takes ``run_s``, notes how many calls run at once, and
    returns its call number; the second call sets ``second``."""

    def __init__(self, run_s=0.0):
        self.run_s = run_s
        self.calls = self.active = self.most_active = 0
        self.second = threading.Event()
        self.lock = threading.Lock()

    def run(self, outputs, feeds):
        with self.lock:
            self.calls += 1
            n = self.calls
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.run_s)
        with self.lock:
            self.active -= 1
        if n == 2:
            self.second.set()
        return n


class ModelThenPost(FakeProcessor):
    """A batch runs its model call, then post-processes; the first batch's post-processing
    waits (up to 5 s) for the second batch's model call to have run."""

    overlapped = None

    def run_batch(self, session, items):
        n = session.run(None, {})
        if n == 1:
            self.overlapped = session.second.wait(5)
        self.batches.append((n, len(items)))
        return [ItemResult(regions=(RegionOut(text=f"batch{n}"),), child_payloads=()) for _ in items]


def make_model_core(session):
    procs = {}

    def loader(variant):
        procs[variant.name] = ModelThenPost(variant, 0.0)
        return ModelHost(variant, procs[variant.name], session=session, providers=["FakeProvider"])

    return WorkerCore("w", SPEC.task("t"), ".", loader=loader), procs


def test_a_batch_queued_behind_runs_its_model_while_the_one_before_post_processes():
    async def scenario():
        session = CountingSession()
        core, procs = make_model_core(session)
        core.start()
        await core.apply("v1", 2, 1)
        outs = await asyncio.wait_for(core.submit([(f"q{i}", b"x") for i in range(4)], time.time() + 30), 20)
        await core.stop()
        return core, procs["v1"], outs

    core, proc, outs = asyncio.run(scenario())
    assert proc.overlapped is True        # batch 2's model call ran during batch 1's post-processing
    assert core.counters["queued_ahead"] == 1
    assert [o.result.regions[0].text for o in outs] == ["batch1"] * 2 + ["batch2"] * 2
    assert all(o.status is Status.OK and o.batch_size == 2 for o in outs)


def test_model_calls_never_overlap_while_batches_do():
    async def scenario():
        session = CountingSession(run_s=0.01)
        session.second.set()             # no batch waits in its post-processing
        core, procs = make_model_core(session)
        core.start()
        await core.apply("v1", 2, 1)
        outs = await core.submit([(f"q{i}", b"x") for i in range(12)], time.time() + 30)
        await core.stop()
        return core, session, outs

    core, session, outs = asyncio.run(scenario())
    assert session.calls == 6 and session.most_active == 1   # 12 queries, batches of 2, one model call at a time
    assert core.counters["queued_ahead"] >= 1 and all(o.status is Status.OK for o in outs)


def test_batches_queued_ahead_count_against_the_queue_bound_and_get_an_answer_on_stop():
    from services.common.errors import Shed

    async def scenario():
        core, procs = make_core(delay_s=0.2)
        core.max_queue = 5
        core.start()
        await core.apply("v1", 2, 1)
        first = asyncio.create_task(core.submit([(f"a{i}", b"x") for i in range(4)], time.time() + 10))
        await asyncio.sleep(0.05)                   # a0, a1 run; a2, a3 are queued ahead
        assert core.waiting == 2 and core.queue.queued == 0 and core.stats()["queue_length"] == 2
        with pytest.raises(Shed, match="queue full"):
            await core.submit([(f"b{i}", b"x") for i in range(4)], time.time() + 10)   # 2 + 4 > 5
        await core.stop()                           # while a0, a1 run and a2, a3 wait behind
        return await asyncio.wait_for(first, 5)

    outs = asyncio.run(scenario())
    assert [o.status for o in outs] == [Status.INTERNAL] * 4


# -- pre-processing on the loop when it costs less than the thread hand-off ---------------

class TimedPrepProcessor(FakeProcessor):
    """Records which thread prepared each payload; ``b"slow"`` takes 2 ms to prepare, and
    every payload ``prep_s`` (default: nothing)."""

    prep_s = 0.0

    def __init__(self, variant, delay_s=0.0):
        super().__init__(variant, delay_s)
        self.prep_threads: list[tuple[bytes, int]] = []

    def prepare(self, payload):
        self.prep_threads.append((payload, threading.get_ident()))
        if payload == b"slow":
            time.sleep(0.002)
        elif self.prep_s:
            time.sleep(self.prep_s)
        return Prepared(payload)


def make_prep_core(prep_s=0.0):
    procs = {}

    def loader(variant):
        procs[variant.name] = TimedPrepProcessor(variant)
        procs[variant.name].prep_s = prep_s
        return ModelHost(variant, procs[variant.name], session=None, providers=["FakeProvider"])

    return WorkerCore("w", SPEC.task("t"), ".", loader=loader), procs


async def until_prepared_on_the_loop(core, proc, in_a_row: int) -> list[bool]:
    """Send one-query requests until ``in_a_row`` of them in a row were prepared on the
    event loop (a busy machine may time a cheap prepare as slow now and then, which resets
    the streak: so up to 200 tries); for each, whether it was."""
    loop_thread, where = threading.get_ident(), []
    for i in range(200):
        await core.submit([(f"q{i}", b"x")], time.time() + 10)
        where.append(proc.prep_threads[-1][1] == loop_thread)
        if where[-in_a_row:] == [True] * in_a_row:
            break
    return where


def test_cheap_inputs_are_prepared_on_the_loop_after_a_streak_and_a_slow_one_sends_them_back(monkeypatch):
    import services.worker.host as core_mod
    monkeypatch.setattr(core_mod, "INLINE_PREP_STREAK", 4)

    async def scenario():
        core, procs = make_prep_core()
        core.start()
        await core.apply("v1", 4, plan_version=1)
        loop_thread = threading.get_ident()
        where = await until_prepared_on_the_loop(core, procs["v1"], 3)
        inline_before = core.counters["prepared_inline"]
        await core.submit([("s", b"slow")], time.time() + 10)       # on the loop, then measured slow
        slow_on_loop = procs["v1"].prep_threads[-1][1] == loop_thread
        await core.submit([("after", b"x")], time.time() + 10)
        after_on_loop = procs["v1"].prep_threads[-1][1] == loop_thread
        await core.stop()
        return where, inline_before, slow_on_loop, after_on_loop, core

    where, inline_before, slow_on_loop, after_on_loop, core = asyncio.run(scenario())
    assert where[:4] == [False] * 4            # the first four go to the pool: no streak yet
    assert where[-3:] == [True] * 3, where     # then, four cheap ones in a row, the loop
    assert inline_before == where.count(True)
    assert slow_on_loop                        # decided before it was measured
    assert not after_on_loop                   # one slow item: back to the pool
    assert core.stats()["completed"] == len(where) + 2


def test_a_request_past_the_inline_budget_is_prepared_in_the_pool(monkeypatch):
    import services.worker.host as core_mod
    monkeypatch.setattr(core_mod, "INLINE_PREP_STREAK", 4)

    async def scenario():
        core, procs = make_prep_core()
        core.start()
        await core.apply("v1", 8, plan_version=1)
        loop_thread = threading.get_ident()
        assert (await until_prepared_on_the_loop(core, procs["v1"], 1))[-1]
        n = int(core_mod.INLINE_PREP_BUDGET_S / core_mod.INLINE_PREP_ITEM_S) + 1
        outs = await core.submit([(f"big{i}", b"x") for i in range(n)], time.time() + 10)
        big = procs["v1"].prep_threads[-n:]
        await core.stop()
        return outs, big, loop_thread

    outs, big, loop_thread = asyncio.run(scenario())
    assert all(o.status is Status.OK for o in outs)
    assert all(t != loop_thread for _, t in big)


def test_inputs_that_take_longer_than_a_hand_off_are_never_prepared_on_the_loop(monkeypatch):
    import services.worker.host as core_mod
    monkeypatch.setattr(core_mod, "INLINE_PREP_STREAK", 4)

    async def scenario():
        core, procs = make_prep_core(prep_s=0.0002)   # 200 us an item, like a small crop
        core.start()
        await core.apply("v1", 4, plan_version=1)
        for i in range(20):
            await core.submit([(f"q{i}", b"x")], time.time() + 10)
        await core.stop()
        return core, procs["v1"], threading.get_ident()

    core, proc, _ = asyncio.run(scenario())
    assert len(proc.prep_threads) == 20
    assert core.counters["prepared_inline"] == 0
