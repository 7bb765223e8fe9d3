"""services/common/metrics.py: what each service's collector exports, read from the
process registry the /metrics endpoint serves (no socket: ``generate_latest``)."""
from __future__ import annotations

import argparse
import asyncio
from enum import Enum
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import (ControllerMetrics, FrontDoorMetrics, RouterMetrics, WorkerMetrics,
                                     add_metrics_argument, metric_names)
from services.common.spec import parse_spec
from services.controller.core import ControllerCore
from services.controller.registry import WorkerRegistry


def samples() -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(name: str, **labels) -> float | None:
    return samples().get((name, tuple(sorted(labels.items()))))


class Obj(SimpleNamespace):
    """A fake service object (weakly referenceable, as the real ones are)."""


class State(str, Enum):
    IDLE = "idle"
    SERVING = "serving"
    PARKED = "parked"


def fake_worker(wid: str, **counters) -> SimpleNamespace:
    base = {"arrivals": 0, "completed": 0, "dropped": 0, "errors": 0, "invalid": 0, "shed": 0, "parks": 0}
    return Obj(worker_id=wid, counters={**base, **counters}, waiting=0,
                           plan_version=0, state=State.IDLE, host=None, task=None, batch_size=1)


def test_a_worker_s_counters_queue_and_state_are_read_when_scraped():
    core = fake_worker("mw-1")
    core.metrics = WorkerMetrics(core)
    core.counters["completed"] += 7          # the core's own counting, nothing else
    core.counters["shed"] += 2
    core.waiting = 5                          # queued, or in a batch queued behind the running one
    core.plan_version = 3
    core.state = State.PARKED
    assert get("pipeserve_worker_queries_total", worker="mw-1", outcome="ok") == 7
    assert get("pipeserve_worker_queries_total", worker="mw-1", outcome="shed") == 2
    assert get("pipeserve_worker_queue_length", worker="mw-1") == 5
    assert get("pipeserve_worker_plan_version", worker="mw-1") == 3
    # every state of the core's enum is listed, the current one 1: a new state shows by itself
    assert {s.value: get("pipeserve_worker_state", worker="mw-1", state=s.value) for s in State} == \
        {"idle": 0, "serving": 0, "parked": 1}
    assert get("pipeserve_worker_model", worker="mw-1", task="", variant="v") is None   # no model held
    core.state = State.SERVING
    core.host, core.task = SimpleNamespace(variant=SimpleNamespace(name="v")), SimpleNamespace(name="t")
    assert get("pipeserve_worker_model", worker="mw-1", task="t", variant="v") == 1
    assert get("pipeserve_worker_state", worker="mw-1", state="serving") == 1


def test_batches_and_loads_are_observed_under_the_worker_id_it_has_then():
    core = fake_worker("pending")
    core.metrics = WorkerMetrics(core)
    core.worker_id = "mw-2"                  # the id is known once the server bound its port
    core.metrics.model_loaded("v", 0.4)
    assert get("pipeserve_worker_batch_size_count", worker="mw-2", variant="v") == 0   # zero from the load
    core.metrics.batch("v", 4, 0.02)
    core.metrics.batch("v", 2, 0.01)
    assert get("pipeserve_worker_batch_size_count", worker="mw-2", variant="v") == 2
    assert get("pipeserve_worker_batch_size_sum", worker="mw-2", variant="v") == 6   # 4 + 2
    assert get("pipeserve_worker_batch_size_bucket", worker="mw-2", variant="v", le="2.0") == 1
    assert get("pipeserve_worker_batch_seconds_sum", worker="mw-2", variant="v") == pytest.approx(0.03)
    assert get("pipeserve_worker_model_load_seconds_count", worker="mw-2", variant="v") == 1
    assert get("pipeserve_worker_batch_size_count", worker="pending", variant="v") is None


def test_two_cores_with_one_id_in_a_process_export_it_once():
    old, new = fake_worker("mw-3", completed=1), fake_worker("mw-3", completed=9)
    old.metrics, new.metrics = WorkerMetrics(old), WorkerMetrics(new)   # no duplicate registration
    text = generate_latest(REGISTRY).decode()
    assert text.count('pipeserve_worker_queries_total{outcome="ok",worker="mw-3"}') == 1
    assert get("pipeserve_worker_queries_total", worker="mw-3", outcome="ok") == 9   # the newest core


def test_a_router_counts_its_stage_s_outcomes_and_reroutes():
    core = Obj(plan=SimpleNamespace(version=4))
    m = RouterMetrics(core, "mr", {1: "ok", 2: "dropped_deadline"})
    m.stage_done([SimpleNamespace(status=1)] * 3 + [SimpleNamespace(status=2)], 0.05)
    m.route_done(0.08)
    m.reroutes_slack += 2
    assert get("pipeserve_router_queries_total", task="mr", outcome="ok") == 3
    assert get("pipeserve_router_queries_total", task="mr", outcome="dropped_deadline") == 1
    assert get("pipeserve_router_reroutes_total", task="mr", reason="slack") == 2
    assert get("pipeserve_router_reroutes_total", task="mr", reason="unavailable") == 0
    assert get("pipeserve_router_stage_seconds_count", task="mr") == 1
    assert get("pipeserve_router_route_seconds_sum", task="mr") == pytest.approx(0.08)
    assert get("pipeserve_router_plan_version", task="mr") == 4


def test_the_front_door_s_counts_and_latency():
    fd = Obj(spec=SimpleNamespace(name="mp"), counts={"received": 5, "accepted": 4, "ok": 3, "shed": 1},
                         inflight_bytes=1024, receiving=8, waiting_to_receive=3,
                         admission=SimpleNamespace(rate=None))
    fd.metrics = FrontDoorMetrics(fd)
    fd.metrics.answered(0.2)
    assert get("pipeserve_frontdoor_requests_total", pipeline="mp", outcome="ok") == 3
    assert get("pipeserve_frontdoor_requests_total", pipeline="mp", outcome="cancelled") == 0
    assert get("pipeserve_frontdoor_received_total", pipeline="mp") == 5
    assert get("pipeserve_frontdoor_inflight_bytes", pipeline="mp") == 1024
    assert get("pipeserve_frontdoor_receiving", pipeline="mp", state="reading") == 8
    assert get("pipeserve_frontdoor_receiving", pipeline="mp", state="waiting") == 3
    assert get("pipeserve_frontdoor_admission_rate_qps", pipeline="mp") is None   # unlimited
    fd.admission.rate = 12.5
    assert get("pipeserve_frontdoor_admission_rate_qps", pipeline="mp") == 12.5
    assert get("pipeserve_frontdoor_latency_seconds_bucket", pipeline="mp", le="0.2") == 1
    assert get("pipeserve_frontdoor_latency_seconds_bucket", pipeline="mp", le="0.15") == 0


SPEC = parse_spec({"name": "mc", "slo_ms": 1000, "tasks": [
    {"name": "det", "children": ["rec"], "variants": [{"name": "d1", "model": "d", "processor": "k"}]},
    {"name": "rec", "variants": [{"name": "r1", "model": "r", "processor": "k"}]}]})
PLAN = """
pipeline: mc
allocations:
  - {task: det, variant: d1, batch_size: 1, replicas: 1}
  - {task: rec, variant: r1, batch_size: 8, replicas: 2}
"""


def test_the_controller_s_gauges_follow_each_reconcile_step():
    async def publish(plan):
        return plan.with_version(7)

    core = ControllerCore(SPEC, WorkerRegistry(timeout_s=5.0, clock=lambda: 0.0), publish)
    core.set_plan_text(PLAN)
    for wid, task in (("det-0", "det"), ("rec-0", "rec"), ("rec-1", "rec")):
        core.registry.register(wid, f"h:{wid}", task, [])
    core.registry.heartbeat("rec-1", {"state": "parked"})
    core.registry.heartbeat("det-0", {"state": "serving"})
    published = get("pipeserve_controller_plans_published_total", pipeline="mc") or 0
    asyncio.run(core.reconcile())
    assert get("pipeserve_controller_plan_version", pipeline="mc") == 7
    assert get("pipeserve_controller_plans_published_total", pipeline="mc") == published + 1
    assert get("pipeserve_controller_plan_workers", pipeline="mc", task="rec", variant="r1") == 2
    assert get("pipeserve_controller_workers", pipeline="mc", state="parked") == 1
    assert get("pipeserve_controller_workers", pipeline="mc", state="serving") == 1
    assert get("pipeserve_controller_workers", pipeline="mc", state="registering") == 1   # no heartbeat yet
    assert get("pipeserve_controller_reconcile_seconds_count", pipeline="mc") >= 1
    assert get("pipeserve_controller_demand_qps", pipeline="mc") == 0
    assert get("pipeserve_controller_planned_demand_qps", pipeline="mc") is None   # operator plan


def test_metric_names_lists_everything_exported():
    ControllerMetrics("mn").update(SimpleNamespace(current=None, demand_qps=0.0, planner=None,
                                                   registry=SimpleNamespace(records={})))
    exported = {name for name, _ in samples() if name.startswith("pipeserve_")}
    assert exported and exported <= metric_names(), exported - metric_names()


@pytest.mark.parametrize("bad", ["x", "-1", "70000"])
def test_a_bad_metrics_port_is_refused_with_a_clear_error(bad, capsys):
    p = argparse.ArgumentParser(prog="svc")
    add_metrics_argument(p)
    assert p.parse_args([]).metrics_port is None            # default: no endpoint
    assert p.parse_args(["--metrics-port", "0"]).metrics_port == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--metrics-port", bad])
    assert "--metrics-port" in capsys.readouterr().err
