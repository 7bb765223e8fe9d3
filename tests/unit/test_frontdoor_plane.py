"""The front door's data plane (services/router/frontdoor_plane.py) called directly, with no
gRPC server, servicer or context: over real RouterCores (det, and rec routed in process as
``--inline-children`` does) whose workers are a hand-written WorkerCaller, the real spec of
pipelines/ocr.yaml and the real OIP codec."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import oip
from services.common.errors import ServingError
from services.common.plan import ANY_PATH, Plan, WorkerAssignment
from services.common.spec import load_spec
from services.gen import pipeserve_pb2 as pb
from services.policy.admission import TokenBucket
from services.router.clients import ChildRouterClient, InlineChildClient
from services.router.core import CallFailed, RouterCore
from services.router.frontdoor_plane import DEFAULT_ANSWER_MARGIN_MS, FrontDoorPlane
from test_frontdoor_servicer import PNG  # tests/unit is on sys.path

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "pipelines" / "ocr.yaml")
PLAN = Plan(3, "ocr", {"det-0": WorkerAssignment("det-0", "det:1", "det", "det_v6small_480", 4),
                       "rec-0": WorkerAssignment("rec-0", "rec:1", "rec", "rec_v6tiny", 8)},
            {"det": {ANY_PATH: {"det-0": 1.0}}, "rec": {ANY_PATH: {"rec-0": 1.0}}})


class Workers:
    """The workers of PLAN: the detector finds two regions on every page, each with its
    crop as the child payload; the recogniser reads a crop's bytes as its text. A worker
    address in ``fail`` raises that error instead."""

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[str, int, float]] = []

    async def infer(self, address: str, request: pb.InferBatchRequest, timeout_s: float) -> pb.InferBatchResponse:
        self.calls.append((address, len(request.queries), timeout_s))
        if address in self.fail:
            raise self.fail[address]
        results = []
        for q in request.queries:
            if address == "det:1":
                r = pb.QueryResult(query_id=q.query_id, status=pb.OK, task="det", variant="det_v6small_480")
                for i in range(2):
                    r.regions.add(points=[0, i, 10, i, 10, i + 5, 0, i + 5], score=0.9)
                    r.child_payloads.append(b"crop %d" % i)
            else:
                r = pb.QueryResult(query_id=q.query_id, status=pb.OK, task="rec", variant="rec_v6tiny")
                r.regions.add(text=q.payload.decode(), confidence=0.8)
            results.append(r)
        return pb.InferBatchResponse(results=results, plan_version=PLAN.version)


@pytest.fixture()
def make_plane():
    made = []

    def make(workers: Workers) -> FrontDoorPlane:
        rec = RouterCore(SPEC, "rec", workers, ChildRouterClient({}))
        det = RouterCore(SPEC, "det", workers, InlineChildClient({"rec": rec}, ChildRouterClient({})))
        for core in (det, rec):
            core.set_plan(PLAN)
        plane = FrontDoorPlane(det, TokenBucket(None))
        made.append(plane)
        return plane

    yield make
    for plane in made:
        plane.close()


def infer(plane: FrontDoorPlane, request, time_remaining: float | None = None):
    async def read():
        return request
    return asyncio.run(plane.infer(read, "id:test", time_remaining))


def test_a_request_is_answered_through_the_real_router_cores_without_grpc(make_plane):
    workers = Workers()
    plane = make_plane(workers)
    response = infer(plane, oip.build_image_request("ocr", PNG, request_id="r1"), time_remaining=0.8)
    assert response.id == "r1" and response.model_name == "ocr" and response.model_version == "1"
    assert [line.text for line in oip.parse_ocr_response(response)] == ["crop 0", "crop 1"]
    assert response.parameters["plan_version"].int64_param == 3
    assert response.parameters["variant_path"].string_param == "det_v6small_480/rec_v6tiny"
    assert [(a, n) for a, n, _ in workers.calls] == [("det:1", 1), ("rec:1", 2)]
    # the pipeline works to the gRPC deadline less the answer margin: 800 - 50 ms
    assert max(t for _, _, t in workers.calls) <= 0.8 - DEFAULT_ANSWER_MARGIN_MS / 1e3
    assert {k: v for k, v in plane.counts.items() if v} == {"arrived": 1, "received": 1, "accepted": 1, "ok": 1}
    assert (plane.inflight_bytes, plane.receiving, plane.waiting_to_receive) == (0, 0, 0)


def test_a_failure_inside_is_raised_as_the_generic_error_of_its_status(make_plane):
    plane = make_plane(Workers(fail={"rec:1": CallFailed(pb.UNAVAILABLE, "worker 10.1.2.3:7001 is down")}))
    with pytest.raises(ServingError) as exc:
        infer(plane, oip.build_image_request("ocr", PNG, request_id="r2"))
    assert exc.value.code == "UNAVAILABLE"
    assert str(exc.value) == "a pipeline stage is unavailable; retry later (at stage 'rec')"
    assert plane.counts["failed"] == 1 and plane.counts["ok"] == 0


def test_an_unknown_model_is_not_found_before_any_worker_is_called(make_plane):
    workers = Workers()
    plane = make_plane(workers)
    with pytest.raises(ServingError) as exc:
        infer(plane, oip.build_image_request("nope", PNG))
    assert exc.value.code == "NOT_FOUND" and "'ocr'" in str(exc.value)
    assert workers.calls == [] and plane.counts["not_found"] == 1


def test_the_data_plane_loads_without_grpc():
    code = ("import sys, services.router.frontdoor_plane, services.router.frontdoor_triton; "
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
