"""The per-request latency breakdown: the pure aggregation (services/router/stats.py), the
worker's batch timing (services/worker/core.py) and the ``timing`` request parameter."""
from __future__ import annotations

import json
import time

import pytest

from services.common import oip
from services.common.errors import InvalidInput
from services.common.processing import ItemResult
from services.gen import pipeserve_pb2 as pb
from services.router.stats import PHASES, breakdown, critical_path, critical_path_ms, stage_phases
from services.worker.core import _run_timed


def timed_tree() -> pb.QueryResult:
    """A det query (root) with two rec children answered by two worker calls; the second
    call took longer (call 30 ms beats 20 ms), so it is on the critical path."""
    root = pb.QueryResult(task="det", variant="d", worker_id="det-0", batch_size=1, queue_ms=1.0,
                          preprocess_ms=4.0, model_ms=20.0, postprocess_ms=3.0, crop_encode_ms=2.0,
                          service_ms=26.0, worker_ms=32.0, call_ms=35.0, children_ms=40.0)
    root.children.add(task="rec", variant="r", worker_id="rec-0", batch_size=2, queue_ms=2.0,
                      preprocess_ms=1.0, model_ms=10.0, postprocess_ms=1.0, service_ms=12.0,
                      worker_ms=16.0, call_ms=20.0)
    root.children.add(task="rec", variant="r", worker_id="rec-1", batch_size=3, queue_ms=5.0,
                      preprocess_ms=2.0, model_ms=15.0, postprocess_ms=2.0, service_ms=18.0,
                      worker_ms=25.0, call_ms=30.0)
    return root


def test_the_critical_path_follows_the_router_measured_round_trip():
    root = timed_tree()
    path = critical_path(root)
    assert [r.worker_id for r in path] == ["det-0", "rec-1"]
    # a child whose worker reported more queue + batch time but whose round trip was shorter
    # is not on it: the router's measurement says which finished last
    root.children[0].queue_ms = 100.0
    assert critical_path(root)[1].worker_id == "rec-1"
    assert critical_path_ms(root) == (1.0 + 5.0, 26.0 + 18.0)
    assert critical_path_ms(path) == critical_path_ms(root)


def test_without_router_times_the_path_is_the_workers_slowest():
    root = pb.QueryResult(queue_ms=1.0, service_ms=1.0)
    root.children.add(worker_id="a", queue_ms=2.0, service_ms=2.0)
    root.children.add(worker_id="b", queue_ms=1.0, service_ms=1.0).children.add(queue_ms=5.0)
    assert [r.worker_id for r in critical_path(root)][1] == "b"   # 1 + 1 + 5 = 7 beats 4


def test_stage_phases_split_the_stage_time_into_its_parts():
    r = timed_tree()
    p = stage_phases(r, outer_ms=80.0)
    assert p["worker"] == pytest.approx(2.0)      # 32 - (1 + 4 + 20 + 3 + 2)
    assert p["transfer"] == pytest.approx(3.0)    # 35 - 32
    assert p["router"] == pytest.approx(5.0)      # 80 - 35 - 40
    assert sum(p.values()) == pytest.approx(80.0 - 40.0)   # the stage's share: all but its children


def test_breakdown_sums_the_phases_over_the_path_and_keeps_the_rest_unaccounted():
    root = timed_tree()
    out = breakdown(critical_path(root), total_ms=90.0, route_ms=82.0, input_ms=0.5, output_ms=1.5)
    ph = out["phases_ms"]
    assert set(ph) == set(PHASES)
    assert ph["queue"] == pytest.approx(6.0)                  # 1 + 5
    assert ph["model"] == pytest.approx(35.0)                 # 20 + 15
    assert ph["crop_encode"] == pytest.approx(2.0)
    assert ph["transfer"] == pytest.approx(3.0 + 5.0)         # (35 - 32) + (30 - 25)
    assert ph["router"] == pytest.approx(7.0 + 10.0)          # (82 - 35 - 40) + (40 - 30 - 0)
    # input + route + output = 84 of the 90: the route's 82 are all attributed
    assert sum(ph.values()) == pytest.approx(0.5 + 82.0 + 1.5)
    assert out["unaccounted_ms"] == pytest.approx(90.0 - 84.0)
    assert [s["task"] for s in out["stages"]] == ["det", "rec"]
    assert out["stages"][1]["worker"] == "rec-1" and out["stages"][1]["queue_ms"] == 5.0
    json.dumps(out)   # JSON-ready
    assert "stages" not in breakdown(critical_path(root), 90.0, 82.0, 0.5, 1.5, stages=False)


def test_inconsistent_clocks_never_give_negative_phases():
    r = pb.QueryResult(queue_ms=5.0, worker_ms=3.0, call_ms=2.0, children_ms=10.0)
    out = breakdown([r], total_ms=1.0, route_ms=4.0, input_ms=0.0, output_ms=0.0)
    assert all(v >= 0 for v in out["phases_ms"].values())
    assert out["unaccounted_ms"] == 0.0


class FakeSession:
    """Sleeps ``run_s`` in ``run``; exposes an attribute processors read."""

    def __init__(self, run_s: float) -> None:
        self.run_s = run_s
        self.calls = 0

    def get_inputs(self):
        return ["x"]

    def run(self, outputs, feeds):
        self.calls += 1
        time.sleep(self.run_s)
        return [feeds]


def test_a_batch_is_split_into_assembly_model_postprocessing_and_encoding():
    def run_batch(session, items):
        assert session.get_inputs() == ["x"]   # the timing wrapper passes the rest through
        time.sleep(0.01)                       # assembling the batch
        session.run(None, {"x": items})
        time.sleep(0.02)                       # post-processing, of which 0.005 s "encoding"
        return [ItemResult(encode_s=0.005) for _ in items]

    session = FakeSession(0.03)
    results, total_s, ph, _ = _run_timed(run_batch, session, [1, 2])
    assert len(results) == 2 and session.calls == 1
    assert ph.model_ms >= 30.0 and ph.assemble_ms >= 10.0
    assert ph.encode_ms == pytest.approx(10.0)                # 2 items x 5 ms
    assert ph.postprocess_ms >= 20.0 - 10.0
    parts = ph.assemble_ms + ph.model_ms + ph.postprocess_ms + ph.encode_ms
    assert parts == pytest.approx(total_s * 1e3)               # nothing lost, nothing twice


def test_the_timing_parameter():
    req = oip.build_image_request("ocr", b"x")
    assert oip.request_wants_timing(req) is False
    assert oip.request_wants_timing(oip.build_image_request("ocr", b"x", timing=True)) is True
    req.parameters[oip.TIMING_PARAM].string_param = " True "
    assert oip.request_wants_timing(req) is True
    req.parameters[oip.TIMING_PARAM].string_param = "false"
    assert oip.request_wants_timing(req) is False
    req.parameters[oip.TIMING_PARAM].string_param = "yes please"
    with pytest.raises(InvalidInput, match="timing"):
        oip.request_wants_timing(req)
    req.parameters[oip.TIMING_PARAM].int64_param = 1
    with pytest.raises(InvalidInput, match="bool"):
        oip.request_wants_timing(req)
