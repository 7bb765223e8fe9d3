"""The controller's ClusterStatus (services/controller/status.py) and what `pipeserve status`
prints from it (services/tools/status.py): pure code, fake clock, no sockets."""
import asyncio

from services.common.spec import parse_spec
from services.controller.core import ControllerCore
from services.controller.registry import WorkerRegistry
from services.controller.status import OutcomeWindow, cluster_status, observe_workers, waiting_for
from services.tools.status import format_status, is_ready

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
        self.t = 100.0

    def __call__(self):
        return self.t


async def _publish(plan):
    return plan.with_version(7)


def core_with(workers: list[tuple[str, str]]):
    clock = FakeClock()
    core = ControllerCore(SPEC, WorkerRegistry(timeout_s=5.0, clock=clock), _publish)
    core.set_plan_text(PLAN)
    for wid, task in workers:
        core.registry.register(wid, f"10.0.0.1:{len(wid)}", task, ["CPUExecutionProvider"])
    asyncio.run(core.reconcile())
    return clock, core


def heartbeat(core, wid, **stats):
    base = {"state": "serving", "variant": "", "batch_size": 0, "plan_version": 7, "queue_length": 0,
            "arrivals": 0, "completed": 0, "dropped": 0, "shed": 0, "errors": 0}
    core.registry.heartbeat(wid, {**base, **stats})


def test_outcome_window_sums_increments_and_survives_a_restart():
    w = OutcomeWindow(keep_s=600)
    w.observe("frontdoor:a", {"ok": 10, "dropped": 1}, now=0.0)      # first sight: history unknown
    w.observe("frontdoor:a", {"ok": 15, "dropped": 1}, now=10.0)     # +5 ok
    w.observe("frontdoor:a", {"ok": 3, "dropped": 2}, now=20.0)      # restarted: 3 ok, 2 dropped new
    w.observe("worker:x", {"dropped": 4}, now=20.0)
    w.observe("worker:x", {"dropped": 9}, now=30.0)                  # +5
    assert w.recent("frontdoor:", 60, now=30.0) == {"ok": 8, "dropped": 2}   # 5 + 3, 0 + 2
    assert w.recent("frontdoor:", 15, now=30.0) == {"ok": 3, "dropped": 2}   # only the one at t=20
    assert w.recent("worker:", 60, now=30.0) == {"dropped": 5}
    assert w.covered_s(60, now=30.0) == 30.0 and w.covered_s(10, now=30.0) == 10.0


def test_outcome_window_forgets_what_is_older_than_it_keeps():
    w = OutcomeWindow(keep_s=100)
    w.observe("worker:x", {"errors": 0}, now=0.0)
    w.observe("worker:x", {"errors": 1}, now=1.0)
    w.observe("worker:x", {"errors": 2}, now=500.0)
    assert w.recent("worker:", 1000, now=500.0) == {"errors": 1}


def test_no_plan_names_the_task_that_waits_for_a_worker():
    _, core = core_with([("det-0", "det")])
    s = cluster_status(core, OutcomeWindow(), now=100.0, now_wall=1000.0)
    assert s["plan"] is None and s["waiting_for_tasks"] == ["rec"]
    assert s["no_plan_reason"] == "waiting for a worker of task rec"
    [w] = s["workers"]
    assert w["worker_id"] == "det-0" and w["state"] == "registered"   # no heartbeat yet
    text = format_status({"pipeline": "ocr", "controller_address": "c:1", "controller": s,
                          "controller_error": "", "redis_url": None, "redis": None, "redis_error": ""})
    assert "plan: NONE (waiting for a worker of task rec)" in text
    assert "pipeserve-worker --task rec" in text
    assert is_ready({"controller": s}) == (False, "waiting for a worker of task rec")


def test_the_plan_workers_demand_and_recent_failures():
    clock, core = core_with([("det-0", "det"), ("rec-0", "rec"), ("rec-1", "rec")])
    window = OutcomeWindow()
    for wid, variant, batch in (("det-0", "d1", 1), ("rec-0", "r1", 8), ("rec-1", "r1", 8)):
        heartbeat(core, wid, variant=variant, batch_size=batch)
    observe_workers(window, core.registry.records.values(), now=100.0)
    window.observe("frontdoor:h:8001", {"received": 100, "ok": 100, "dropped": 0}, now=100.0)
    heartbeat(core, "rec-1", variant="r1", batch_size=8, dropped=3, completed=40, state="swapping")
    observe_workers(window, core.registry.records.values(), now=130.0)
    window.observe("frontdoor:h:8001", {"received": 160, "ok": 150, "dropped": 6, "shed": 4}, now=130.0)
    s = cluster_status(core, window, window_s=60, now=130.0, now_wall=1000.0)
    assert s["plan"]["version"] == 7
    assert [(a["task"], a["variant"], a["batch_size"], a["replicas"]) for a in s["plan"]["allocations"]] == \
        [("det", "d1", 1, 1), ("rec", "r1", 8, 2)]
    states = {w["worker_id"]: w["state"] for w in s["workers"]}
    assert states == {"det-0": "serving", "rec-0": "serving", "rec-1": "swapping"}
    assert s["recent"]["frontdoor"]["received"] == 60 and s["recent"]["frontdoor"]["ok"] == 50   # 160 - 100
    assert s["recent"]["frontdoor"]["dropped"] == 6 and s["recent"]["frontdoor"]["shed"] == 4
    assert s["recent"]["workers"] == {"completed": 40, "dropped": 3}
    assert s["demand"]["measured_qps"] == 2.0   # 60 requests over the 30 s the window saw
    assert is_ready({"controller": s}) == (False, "planned workers not serving yet: rec-1 (swapping)")
    text = format_status({"pipeline": "ocr", "controller_address": "c:1", "controller": s,
                          "controller_error": "", "redis_url": None, "redis": None, "redis_error": ""})
    assert "last 30 s at the front door: 60 requests, 50 OK, 10 not answered OK (6 dropped, 4 shed" in text
    assert "rec-1   rec   swapping" in text


def test_a_planned_worker_that_left_is_listed_as_missing():
    clock, core = core_with([("det-0", "det"), ("rec-0", "rec"), ("rec-1", "rec")])
    clock.t += 10   # every worker silent past the timeout
    core.registry.heartbeat("det-0", {"state": "serving"})
    core.registry.heartbeat("rec-0", {"state": "serving"})
    core.registry.expire()
    s = cluster_status(core, OutcomeWindow(), now=clock.t, now_wall=1000.0)
    missing = [w for w in s["workers"] if w["state"] == "missing"]
    assert [w["worker_id"] for w in missing] == ["rec-1"] and missing[0]["last_seen_s"] is None
    assert waiting_for(core) == []   # rec-0 still serves rec


def test_unreachable_sources_are_said_and_what_there_is_is_shown():
    text = format_status({"pipeline": "ocr", "controller_address": "127.0.0.1:50050", "controller": None,
                          "controller_error": "UNAVAILABLE: failed to connect", "redis_url": "redis://h:1/0",
                          "redis": {"plan": None, "frontdoors": {"h:8001": {"received": 5, "ok": 4}}},
                          "redis_error": ""})
    assert "controller: NOT REACHABLE (UNAVAILABLE: failed to connect)" in text
    assert "pass --controller HOST:PORT" in text
    assert "plan: none in Redis" in text and "h:8001: received 5, ok 4" in text
