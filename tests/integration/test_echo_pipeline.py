"""The no-op echo pipeline (pipelines/echo.yaml) end to end as real processes: Redis, the
controller on an operator plan, one worker per stage running the ONNX Identity model in
ONNX Runtime, and two routers, the root one the OIP v2 front door."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common import oip
from services.echo.model import write_identity_model
from services.echo.processors import digest
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.tools.cluster import ClusterConfig, LocalCluster

from echo_support import PLAN, SPEC, png


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("echo")
    models = tmp / "models"
    write_identity_model(models / "echo" / "identity.onnx")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models, log_dir=tmp / "logs"))
    t0 = time.monotonic()
    c.start(ready_timeout_s=60)
    c.ready_s = time.monotonic() - t0
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


def test_a_request_goes_through_both_stages_and_its_bytes_come_back(cluster):
    image = png(40, seed=1)
    with grpc.insecure_channel(cluster.front_door) as ch:
        resp = ipb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            oip.build_image_request("echo", image, request_id="e1"), timeout=10)
    [line] = oip.parse_ocr_response(resp)
    assert line.text == digest(image)                   # stage a's model gave back the bytes
    params = oip.read_parameters(resp.parameters)
    assert params["variant_path"] == "echo_a/echo_b"    # and stage b ran on them


def test_the_root_router_returns_both_stages_results(cluster):
    """The internal Route RPC shows the whole result tree: stage b got exactly one query per
    request, carrying the request's bytes."""
    image = png(24, seed=2)
    with grpc.insecure_channel(cluster.front_door) as ch:
        resp = pb_grpc.RouterStub(ch).Route(pb.RouteRequest(
            request_id="e2", deadline_unix_s=time.time() + 5,
            queries=[pb.Query(query_id="e2", payload=image)]), timeout=10)
    [root] = resp.results
    assert root.status == pb.OK and root.variant == "echo_a" and root.task == "a"
    assert [r.text for r in root.regions] == [digest(image)]
    [child] = root.children
    assert child.status == pb.OK and child.task == "b" and child.variant == "echo_b"
    assert child.query_id == "e2.0"
    assert [r.text for r in child.regions] == [digest(image)]
    assert not root.child_payloads                      # the router consumed them


def test_concurrent_requests_of_different_sizes_each_get_their_own_bytes(cluster):
    """Concurrent requests are batched together (one ONNX Runtime call per batch): each must
    still get back its own bytes."""
    images = [png(8 + 9 * i, seed=10 + i) for i in range(12)]

    def one(i_image):
        i, image = i_image
        with grpc.insecure_channel(cluster.front_door) as ch:
            resp = ipb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                oip.build_image_request("echo", image, request_id=f"c{i}"), timeout=10)
        return oip.parse_ocr_response(resp)[0].text, oip.read_parameters(resp.parameters)["variant_path"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(one, enumerate(images)))
    assert got == [(digest(im), "echo_a/echo_b") for im in images]


def test_the_cluster_starts_quickly(cluster):
    # cold start (spawn to serving) of Redis, controller, 2 workers, 2 routers; the issue's
    # target is < 3 s on a quiet machine, bench/bench_noop_chain.py measures it; this is a
    # loose bound so a busy CI machine does not fail it
    assert cluster.ready_s < 30


def test_the_whole_cluster_runs_on_uvloop(tmp_path, monkeypatch):
    """PIPESERVE_EVENT_LOOP=uvloop (inherited by every process the cluster starts): gRPC's
    asyncio server and client work on it end to end, and every service stops cleanly."""
    monkeypatch.setenv("PIPESERVE_EVENT_LOOP", "uvloop")
    write_identity_model(tmp_path / "models" / "echo" / "identity.onnx")
    (tmp_path / "plan.yaml").write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=tmp_path / "plan.yaml", models=tmp_path / "models",
                                   log_dir=tmp_path / "logs"))
    c.start(ready_timeout_s=90)
    try:
        images = [png(16 + i, seed=100 + i) for i in range(12)]
        with grpc.insecure_channel(c.front_door) as ch:
            stub = ipb_grpc.GRPCInferenceServiceStub(ch)
            with ThreadPoolExecutor(4) as pool:
                resps = list(pool.map(lambda im: stub.ModelInfer(
                    oip.build_image_request("echo", im), timeout=30), images))
        assert [oip.parse_ocr_response(r)[0].text for r in resps] == [digest(im) for im in images]
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)
    for name in codes:
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert "event_loop" in log and "kind=uvloop" in log, f"{name} did not say it ran on uvloop"


def test_one_router_process_can_route_both_stages(tmp_path):
    """ClusterConfig(inline_routers=True): the front door's process routes stage b itself
    (``--inline-children``), with no router process or gRPC hop for b; the answers are the
    same, stage b's result included, and it stops cleanly."""
    write_identity_model(tmp_path / "models" / "echo" / "identity.onnx")
    (tmp_path / "plan.yaml").write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=tmp_path / "plan.yaml", models=tmp_path / "models",
                                   log_dir=tmp_path / "logs", inline_routers=True))
    c.start(ready_timeout_s=90)
    try:
        assert sorted(n for n in c.procs if n.startswith("router-")) == ["router-a"]
        images = [png(12 + 5 * i, seed=200 + i) for i in range(12)]
        with grpc.insecure_channel(c.front_door) as ch:
            stub = ipb_grpc.GRPCInferenceServiceStub(ch)
            with ThreadPoolExecutor(4) as pool:
                resps = list(pool.map(lambda im: stub.ModelInfer(
                    oip.build_image_request("echo", im), timeout=30), images))
            route = pb_grpc.RouterStub(ch).Route(pb.RouteRequest(
                request_id="i1", deadline_unix_s=time.time() + 10,
                queries=[pb.Query(query_id="i1", payload=images[0])]), timeout=30)
        assert [oip.parse_ocr_response(r)[0].text for r in resps] == [digest(im) for im in images]
        assert {oip.read_parameters(r.parameters)["variant_path"] for r in resps} == {"echo_a/echo_b"}
        [root] = route.results
        [child] = root.children
        assert child.status == pb.OK and child.task == "b" and child.variant == "echo_b"
        assert child.query_id == "i1.0" and [r.text for r in child.regions] == [digest(images[0])]
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)
    assert "inline=['b']" in (tmp_path / "logs" / "router-a.log").read_text()
