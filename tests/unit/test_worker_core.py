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
        await core.stop()
        return core, procs["v1"], outs

    core, proc, outs = asyncio.run(scenario())
    assert [o.query_id for o in outs] == [f"q{i}" for i in range(10)]
    assert all(o.status is Status.OK and len(o.result.regions) == 2 for o in outs)
    assert max(proc.batches) == 4 and sum(proc.batches) == 10
    assert all(name.startswith("w-infer") for name in proc.threads)
    s = core.stats()
    assert s["completed"] == 10 and s["providers"] == ["FakeProvider"] and s["mean_fan_out"] == 2.0


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
