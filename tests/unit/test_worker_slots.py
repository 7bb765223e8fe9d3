"""The worker's slot table: standby models for parked workers, warm switches, and the
memory budget (a hand-written fake processor and a loader that counts loads; no ONNX,
no sockets)."""
import asyncio
import gc
import threading
import time
import weakref

import pytest

from services.common.errors import Unavailable
from services.common.processing import ItemResult, Prepared, Processor, RegionOut
from services.common.spec import parse_spec
from services.worker.host import ModelHost
from services.worker.slots import Role, SlotTable, Want
from services.worker.core import Status, WorkerCore

SPEC = parse_spec({"name": "p", "slo_ms": 1000, "tasks": [
    {"name": "a", "children": ["b"], "variants": [{"name": "a1", "model": "m", "processor": "fake"}]},
    {"name": "b", "variants": [{"name": "b1", "model": "m", "processor": "fake"},
                               {"name": "b2", "model": "m", "processor": "fake"}]}]})


class Fake(Processor):
    def prepare(self, payload):
        return Prepared(payload)

    def run_batch(self, session, items):
        return [ItemResult(regions=(RegionOut(text=self.variant.name),), child_payloads=()) for _ in items]


class Loader:
    """Counts loads, by variant; ``fail`` names variants whose load raises; a load waits
    for ``gate`` when one is set (to hold it in flight)."""

    def __init__(self, fail=(), gate: threading.Event | None = None):
        self.loads: list[str] = []
        self.fail = set(fail)
        self.gate = gate

    def __call__(self, variant):
        self.loads.append(variant.name)
        if self.gate is not None:
            self.gate.wait(10)
        if variant.name in self.fail:
            raise RuntimeError(f"cannot load {variant.name}")
        return ModelHost(variant, Fake(variant, "."), session=None, providers=["FakeProvider"])


def pool_core(loader, linger_s=60.0, **kw):
    return WorkerCore("w", None, ".", loader=loader, linger_s=linger_s,
                      tasks={t.name: t for t in SPEC.tasks}, **kw)


async def until(cond, what: str):
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def held(core):
    return {f"{s.task}/{s.variant}": (s.role.value, s.state.value) for s in core.models.slots.slots.values()}


def test_a_parked_worker_loads_its_standby_and_switches_to_it_without_a_load():
    async def scenario():
        loader = Loader()
        core = pool_core(loader, linger_s=0.0)
        core.start()
        await core.apply("a1", 1, plan_version=1, task="a")
        assert await core.park(plan_version=2, standby=("b", "b2")) is True
        await until(lambda: core.models.slots.ready_host(("b", "b2")) is not None, "the standby loaded")
        standby = core.models.slots.ready_host(("b", "b2"))
        parked = core.stats()
        with pytest.raises(Unavailable, match="parked"):     # a standby serves nothing
            await core.submit([("q", b"x")], time.time() + 10, task="b")
        loads_parked = list(loader.loads)
        changed = await core.apply("b2", 2, plan_version=3, task="b")
        # serving at once: no await between apply's return and this state
        state, host = core.state.value, core.host
        out = await core.submit([("q", b"x")], time.time() + 10, task="b")
        stats = core.stats()
        await core.stop()
        return loader, parked, loads_parked, changed, state, host is standby, out, stats, core

    loader, parked, loads_parked, changed, state, same, out, stats, core = asyncio.run(scenario())
    assert parked["state"] == "parked" and parked["variant"] == "" and parked["task"] == ""
    assert loads_parked == ["a1", "b2"]                      # parking with a standby: one load
    assert changed and state == "serving" and same           # the standby's own model now serves
    assert loader.loads == ["a1", "b2"]                      # and no further load
    assert core.counters["warm_switches"] == 1 and stats["loads"] == 2
    assert out[0].status is Status.OK and out[0].variant == "b2"


def test_a_standby_the_next_plan_no_longer_names_is_freed():
    async def scenario():
        loader = Loader()
        core = pool_core(loader)
        await core.park(plan_version=1, standby=("b", "b2"))
        await until(lambda: core.models.slots.ready_host(("b", "b2")) is not None, "the standby loaded")
        ref = weakref.ref(core.models.slots.ready_host(("b", "b2")))
        await core.park(plan_version=2, standby=("b", "b1"))     # another standby: b2 freed, b1 loaded
        await until(lambda: core.models.slots.ready_host(("b", "b1")) is not None, "the new standby loaded")
        gc.collect()
        replaced = ref() is None and held(core) == {"b/b1": ("standby", "ready")}
        ref = weakref.ref(core.models.slots.ready_host(("b", "b1")))
        await core.park(plan_version=3)                          # none named: freed
        gc.collect()
        none_named = ref() is None and held(core) == {}
        await core.park(plan_version=4, standby=("b", "b2"))
        await until(lambda: core.models.slots.ready_host(("b", "b2")) is not None, "the standby loaded")
        await core.apply("a1", 1, plan_version=5, task="a")      # runs another model: the standby goes
        after_apply = held(core)
        await core.stop()
        return loader, replaced, none_named, after_apply

    loader, replaced, none_named, after_apply = asyncio.run(scenario())
    assert replaced and none_named
    assert after_apply == {"a/a1": ("planned", "ready")}
    assert loader.loads == ["b2", "b1", "b2", "a1"]


def test_a_failed_standby_load_is_logged_and_the_worker_stays_parked():
    async def scenario():
        loader = Loader(fail={"b2"})
        core = pool_core(loader, linger_s=0.0)
        core.start()
        await core.apply("a1", 1, plan_version=1, task="a")
        await core.park(plan_version=2, standby=("b", "b2"))
        await until(lambda: loader.loads == ["a1", "b2"] and not core.models.slots.slots, "the standby load failed")
        parked = core.stats()["state"]
        await core.apply("b1", 1, plan_version=3, task="b")     # the next plan still works
        out = await core.submit([("q", b"x")], time.time() + 10, task="b")
        await core.stop()
        return parked, out, core

    parked, out, core = asyncio.run(scenario())
    assert parked == "parked" and out[0].variant == "b1" and core.counters["warm_switches"] == 0


def test_a_plan_naming_a_standby_still_loading_waits_for_that_load_instead_of_loading_again():
    async def scenario():
        gate = threading.Event()
        loader = Loader(gate=gate)
        core = pool_core(loader)
        core.start()
        await core.park(plan_version=1, standby=("b", "b2"))
        await until(lambda: loader.loads == ["b2"], "the standby load started")
        apply = asyncio.ensure_future(core.apply("b2", 1, plan_version=2, task="b"))
        await asyncio.sleep(0.05)
        waiting = core.state.value
        query = asyncio.ensure_future(core.submit([("q", b"x")], time.time() + 10, task="b"))
        await asyncio.sleep(0.05)
        gate.set()
        await apply
        out = await query
        await core.stop()
        return loader, waiting, out, core

    loader, waiting, out, core = asyncio.run(scenario())
    assert waiting == "loading" and loader.loads == ["b2"]    # one load, awaited by the plan
    assert out[0].status is Status.OK and out[0].variant == "b2"   # the query waited for it too
    assert core.counters["loads"] == 1 and core.counters["warm_switches"] == 0


def test_parking_with_the_model_it_serves_as_standby_keeps_it_lingering_then_ready():
    async def scenario():
        loader = Loader()
        core = pool_core(loader, linger_s=0.2)
        core.start()
        await core.apply("b2", 1, plan_version=1, task="b")
        await core.park(plan_version=2, standby=("b", "b2"))
        stale = await core.submit([("late", b"x")], time.time() + 10, task="b")   # within the linger
        released = core.release_lingering(now=time.monotonic() + 1.0)
        after_linger = held(core)
        with pytest.raises(Unavailable, match="parked"):
            await core.submit([("q", b"x")], time.time() + 10, task="b")
        await core.apply("b2", 1, plan_version=3, task="b")
        await core.stop()
        return loader, stale, released, after_linger, core

    loader, stale, released, after_linger, core = asyncio.run(scenario())
    assert stale[0].status is Status.OK and stale[0].variant == "b2"
    assert released == [] and after_linger == {"b/b2": ("standby", "ready")}
    assert loader.loads == ["b2"] and core.counters["warm_switches"] == 1


def test_moving_back_to_a_lingering_model_costs_no_load():
    async def scenario():
        loader = Loader()
        core = pool_core(loader)
        await core.apply("b1", 1, plan_version=1, task="b")
        await core.apply("a1", 1, plan_version=2, task="a")
        await core.apply("b1", 1, plan_version=3, task="b")
        await core.stop()
        return loader, core

    loader, core = asyncio.run(scenario())
    assert loader.loads == ["b1", "a1"] and core.counters["warm_switches"] == 1
    assert held(core) == {"b/b1": ("planned", "ready"), "a/a1": ("lingering", "ready")}


SIZES = {"a1": 100.0, "b1": 100.0, "b2": 100.0}


def test_the_memory_budget_evicts_the_least_recently_used_lingering_model_for_a_standby():
    async def scenario():
        loader = Loader()
        core = pool_core(loader, model_memory_mb=250, model_size_mb=lambda v: SIZES[v.name])
        await core.apply("b1", 1, plan_version=1, task="b")
        await core.apply("a1", 1, plan_version=2, task="a")        # b1 lingers: 200 MB held
        both = held(core)
        await core.park(plan_version=3, standby=("b", "b2"))      # a1 lingers too; b2 needs 100 more
        await until(lambda: core.models.slots.ready_host(("b", "b2")) is not None, "the standby loaded")
        after = held(core)
        await core.stop()
        return both, after

    both, after = asyncio.run(scenario())
    assert both == {"b/b1": ("lingering", "ready"), "a/a1": ("planned", "ready")}
    # 300 > 250: the older lingering model (b1) goes; a1, used since, still serves stale queries
    assert after == {"a/a1": ("lingering", "ready"), "b/b2": ("standby", "ready")}


def test_the_memory_budget_never_evicts_the_planned_model_and_skips_a_burst_that_does_not_fit():
    async def scenario():
        loader = Loader()
        core = pool_core(loader, model_memory_mb=150, model_size_mb=lambda v: SIZES[v.name])
        await core.apply("b1", 1, plan_version=1, task="b")
        await core.apply("a1", 1, plan_version=2, task="a")        # b1 would linger: over budget, freed
        moved = held(core)
        core.models.slots.budget_mb = 50                                  # less than the planned model alone
        core.release_lingering()                                   # a reconcile: over budget, nothing to evict
        kept = held(core)
        core.models.slots.budget_mb = 150
        await core.apply("b1", 2, plan_version=3, task="b")
        core.set_burst("b", "b2", {1: 5.0})                        # 200 > 150 with b1 planned: not loaded
        await asyncio.sleep(0.05)
        burst = held(core), core.burst
        await core.stop()
        return moved, kept, burst, loader

    moved, kept, (with_burst, burst), loader = asyncio.run(scenario())
    assert moved == {"a/a1": ("planned", "ready")}
    assert kept == {"a/a1": ("planned", "ready")}
    assert with_burst == {"b/b1": ("planned", "ready")} and burst is None
    assert loader.loads == ["b1", "a1", "b1"]


def test_reconcile_relabels_frees_and_evicts_by_the_rules():
    table = SlotTable(linger_s=5.0, budget_mb=250)
    for i, (key, role) in enumerate([(("b", "b1"), Role.PLANNED), (("b", "b2"), Role.BURST),
                                     (("a", "a1"), Role.STANDBY)]):
        slot = table.add(key, role, 100.0, now=float(i))
        table.mark_ready(slot, object(), now=float(i))
    loading = table.add(("c", "c1"), Role.STANDBY, 100.0, now=3.0)   # loading: never evicted
    # the plan now runs a1 (standby -> planned), b1 lingers, no burst; 400 MB > 250
    out = table.reconcile(Want(serving=("a", "a1"), standby=("c", "c1")), now=10.0)
    roles = {f"{s.task}/{s.variant}": s.role.value for s in table.slots.values()}
    assert sorted((str(s), why) for s, why in out.freed) == [("b/b1", "memory budget"),
                                                            ("b/b2", "burst no longer named")]
    assert roles == {"a/a1": "planned", "c/c1": "standby"} and loading.state.value == "loading"
    assert table.slots[("a", "a1")].until == float("inf")


def test_the_model_memory_flag_is_parsed_and_a_negative_budget_refused(capsys):
    from services.worker.main import parse_config

    base = ["--spec", "pipelines/ocr.yaml", "--controller", "c:1", "--redis-url", "redis://r"]
    assert parse_config(base).model_memory_mb == 0.0
    assert parse_config(base + ["--model-memory-mb", "512"]).model_memory_mb == 512.0
    with pytest.raises(SystemExit):
        parse_config(base + ["--model-memory-mb", "-1"])
    assert "--model-memory-mb must be >= 0" in capsys.readouterr().err


def test_a_plan_that_parks_the_worker_with_a_standby_makes_the_app_load_it():
    from pathlib import Path

    from services.common.plan import Plan, WorkerAssignment
    from services.worker.main import WorkerApp, parse_config

    spec = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"

    async def scenario():
        cfg = parse_config(["--spec", str(spec), "--controller", "c:1", "--redis-url", "redis://r",
                            "--worker-id", "pool-1"])
        app = WorkerApp(cfg)
        loader = Loader()
        app.core = WorkerCore("pool-1", None, ".", loader=loader, tasks={t.name: t for t in app.spec.tasks})
        variant = app.spec.task("det").variants[0].name
        other = WorkerAssignment("pool-0", "h:1", "det", variant, 2)
        plan = Plan(7, app.spec.name, {"pool-0": other}, {}, standby={"pool-1": f"det/{variant}"},
                    latency_ms={"det": {variant: {1: 50.0, 4: 150.0}}})
        await app._on_plan(plan)
        await until(lambda: app.core.models.slots.ready_host(("det", variant)) is not None, "the standby loaded")
        warm_batch = app.core.models.standby_batch
        state = app.core.state.value
        await app.core.stop()
        return loader.loads, variant, warm_batch, state

    loads, variant, warm_batch, state = asyncio.run(scenario())
    assert loads == [variant] and state == "parked"
    assert warm_batch == 4      # the largest batch the plan has figures for in the task
