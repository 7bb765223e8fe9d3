import asyncio

from services.common.plan import Plan
from services.common.spec import parse_spec
from services.controller.core import ControllerCore
from services.controller.registry import WorkerRegistry
from services.planner import parse_profile
from services.policy.planning import PlannerPolicy

from ocr_like_profile import ocr_like_profile_dict  # tests/unit is on sys.path

SPEC = parse_spec({"name": "ocr", "slo_ms": 1000, "tasks": [
    {"name": "det", "children": ["rec"], "variants": [{"name": "d1", "model": "d", "processor": "k"}]},
    {"name": "rec", "variants": [{"name": "r1", "model": "r", "processor": "k"}]}]})
PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: d1, batch_size: 1, replicas: 1}
  - {task: rec, variant: r1, batch_size: 8, replicas: 2}
"""


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakePublisher:
    """Stamps versions like PlanPublisher, or fails like an unreachable Redis."""

    def __init__(self):
        self.version = 0
        self.published: list[Plan] = []
        self.down = False

    async def __call__(self, plan):
        if self.down:
            raise ConnectionError("redis down")
        self.version += 1
        stamped = plan.with_version(self.version)
        self.published.append(stamped)
        return stamped


def setup():
    clock, pub = FakeClock(), FakePublisher()
    core = ControllerCore(SPEC, WorkerRegistry(timeout_s=5.0, clock=clock), pub)
    core.set_plan_text(PLAN)
    return clock, pub, core


def test_publishes_once_every_task_has_a_worker_and_only_on_change():
    clock, pub, core = setup()
    core.registry.register("det-0", "h:1", "det", [])
    asyncio.run(core.reconcile())
    assert pub.published == []                    # no rec worker yet
    core.registry.register("rec-0", "h:2", "rec", [])
    core.dirty = True
    asyncio.run(core.reconcile())
    assert [p.version for p in pub.published] == [1]
    asyncio.run(core.reconcile())                 # nothing changed: no new version
    core.registry.register("rec-1", "h:3", "rec", [])
    core.dirty = True
    asyncio.run(core.reconcile())
    assert [p.version for p in pub.published] == [1, 2]
    assert set(pub.published[-1].workers) == {"det-0", "rec-0", "rec-1"}


def test_silent_workers_leave_the_plan():
    clock, pub, core = setup()
    for wid, task in [("det-0", "det"), ("rec-0", "rec"), ("rec-1", "rec")]:
        core.registry.register(wid, f"h:{wid}", task, [])
    asyncio.run(core.reconcile())
    clock.t = 3.0
    for wid in ("det-0", "rec-0"):
        assert core.registry.heartbeat(wid, {})
    clock.t = 6.0                                  # rec-1 silent for 6 s > 5 s
    result = asyncio.run(core.reconcile())
    assert result.lost == ["rec-1"]
    assert set(pub.published[-1].workers) == {"det-0", "rec-0"}
    assert core.registry.heartbeat("rec-1", {}) is False   # must register again


def test_failed_publish_keeps_the_last_plan_and_retries():
    clock, pub, core = setup()
    core.registry.register("det-0", "h:1", "det", [])
    core.registry.register("rec-0", "h:2", "rec", [])
    asyncio.run(core.reconcile())
    core.registry.register("rec-1", "h:3", "rec", [])
    core.dirty = True
    pub.down = True
    asyncio.run(core.reconcile())                  # logged, loop goes on
    assert core.current.version == 1 and core.dirty
    pub.down = False
    asyncio.run(core.reconcile())
    assert core.current.version == 2


def test_registration_is_idempotent():
    reg = WorkerRegistry(clock=FakeClock())
    assert reg.register("w", "h:1", "det", []) is True
    assert reg.register("w", "h:1", "det", []) is False
    assert reg.register("w", "h:9", "det", []) is True   # new address: membership changed


class ScriptedPlanner(PlannerPolicy):
    """A real planner policy whose solves return the next plan of a script."""

    def __init__(self, plans):
        super().__init__(parse_profile(ocr_like_profile_dict(), source="test"), SPEC.slo_ms)
        self.plans = list(plans)

    def should_replan(self, workers, estimate_qps, now):
        return True

    def decide(self, workers, estimate_qps, previous, now=None, version=0):
        return self.plans.pop(0)


def test_a_plan_that_changes_only_rates_latencies_or_the_burst_variant_is_published():
    from dataclasses import replace

    from services.common.plan import ANY_PATH, WorkerAssignment

    workers = {"det-0": WorkerAssignment("det-0", "h:1", "det", "d1", 1),
               "rec-0": WorkerAssignment("rec-0", "h:2", "rec", "r1", 8)}
    routing = {"det": {ANY_PATH: {"det-0": 1.0}}, "rec": {ANY_PATH: {"rec-0": 1.0}}}
    base = Plan(0, "ocr", workers, routing, source="planner", planned_qps={"det": {ANY_PATH: 2.0}},
                latency_ms={"det": {"d1": {1: 100.0}}}, planned_for_qps=2.0, burst={"det": "d1"})
    script = [base,
              replace(base, created_unix_s=base.created_unix_s + 5),       # the same plan again
              replace(base, planned_qps={"det": {ANY_PATH: 3.0}}),          # rates only
              replace(base, planned_qps={"det": {ANY_PATH: 3.0}}, latency_ms={"det": {"d1": {1: 120.0}}}),
              replace(base, planned_qps={"det": {ANY_PATH: 3.0}}, latency_ms={"det": {"d1": {1: 120.0}}},
                      burst={"det": "d0"})]                                 # the burst variant only
    clock, pub = FakeClock(), FakePublisher()
    core = ControllerCore(SPEC, WorkerRegistry(timeout_s=5.0, clock=clock), pub,
                          planner=ScriptedPlanner(script), clock=clock)
    core.registry.register("det-0", "h:1", "det", [])
    core.registry.register("rec-0", "h:2", "rec", [])
    for _ in script:
        asyncio.run(core.reconcile())
    # 5 solves: the repeat of the first plan is not published, each real change is
    assert [p.version for p in pub.published] == [1, 2, 3, 4]
    assert [p.planned_qps["det"][ANY_PATH] for p in pub.published] == [2.0, 3.0, 3.0, 3.0]
    assert pub.published[2].latency_ms["det"]["d1"][1] == 120.0
    assert pub.published[3].burst == {"det": "d0"}
