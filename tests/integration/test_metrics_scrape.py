"""Every service's Prometheus endpoint (``--metrics-port``), scraped from a real cluster
under load: the echo pipeline (pipelines/echo.yaml) as separate processes, the controller
planning with the CVXPY planner on a small echo profile so its demand estimate and solve
times move too. Scraped before and after the load; the counters must have moved by what
the load did."""
from __future__ import annotations

import json
import ssl
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import oip
from services.common.grpc_utils import TlsConfig
from services.common.metrics import metric_names, serve_metrics
from services.echo.model import write_identity_model
from services.gen import inference_pb2_grpc as ipb_grpc
from services.tools.cluster import ClusterConfig, LocalCluster
from services.tools.devcerts import make_dev_pki

from echo_support import SPEC, png

REQUESTS = 60

# One variant per stage, a few ms per batch: the planner plans both workers at once.
ECHO_PROFILE = {
    "format": "pipeserve-profile/1", "name": "echo", "slo_ms": 1000.0, "device": "test",
    "provenance": "made up for tests/integration/test_metrics_scrape.py",
    "tasks": [
        {"name": "a", "children": ["b"], "fan_out": {"echo_a": {"b": 1.0}},
         "variants": [{"name": "echo_a", "accuracy": 1.0, "latency_ms": {
             "1": {"p50_ms": 2.0, "p95_ms": 4.0}, "4": {"p50_ms": 4.0, "p95_ms": 8.0},
             "8": {"p50_ms": 8.0, "p95_ms": 16.0}}}]},
        {"name": "b", "variants": [{"name": "echo_b", "accuracy": 1.0, "latency_ms": {
            "1": {"p50_ms": 2.0, "p95_ms": 4.0}, "4": {"p50_ms": 4.0, "p95_ms": 8.0},
            "8": {"p50_ms": 8.0, "p95_ms": 16.0}}}]},
    ],
}


def scrape(address: str, context: ssl.SSLContext | None = None) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of every ``pipeserve_`` sample."""
    scheme = "https" if context is not None else "http"
    with urllib.request.urlopen(f"{scheme}://{address}/metrics", timeout=10, context=context) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("pipeserve_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def scrape_all(cluster) -> dict[str, dict]:
    return {name: scrape(addr) for name, addr in cluster.metrics_addresses.items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    models = tmp / "models"
    write_identity_model(models / "echo" / "identity.onnx")
    profile = tmp / "echo_profile.json"
    profile.write_text(json.dumps(ECHO_PROFILE))
    c = LocalCluster(ClusterConfig(spec=SPEC, profile=profile, models=models, log_dir=tmp / "logs",
                                   metrics=True, min_demand_qps=1.0))
    c.start(ready_timeout_s=90)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


def wait_for(check, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def send_load(front_door: str, n: int) -> int:
    """``n`` requests, 4 at a time; returns how many were answered OK."""
    def one(i: int) -> bool:
        with grpc.insecure_channel(front_door) as ch:
            try:
                ipb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                    oip.build_image_request("echo", png(16 + i % 8, seed=i), request_id=f"m{i}"), timeout=20)
                return True
            except grpc.RpcError:
                return False

    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(one, range(n)))


def test_every_service_is_scraped_and_its_counters_move_under_load(cluster):
    names = {"controller", "router-a", "router-b", "worker-a-0", "worker-b-0"}
    assert set(cluster.metrics_addresses) == names
    before = scrape_all(cluster)
    ok = send_load(cluster.front_door, REQUESTS)
    assert ok >= REQUESTS // 2, f"only {ok} of {REQUESTS} requests answered OK"
    # the controller reads the front door's counter every second and hears from each worker
    # every second: wait for its demand estimate and for heartbeats sent after the load,
    # then for a reconcile step after those (its gauges are recomputed at each step)
    ctl = cluster.metrics_addresses["controller"]
    hb = value(scrape(ctl), "pipeserve_controller_heartbeats_total")
    wait_for(lambda: value(now := scrape(ctl), "pipeserve_controller_demand_qps") > 0
             and value(now, "pipeserve_controller_heartbeats_total") >= hb + 4,
             what="a demand estimate and fresh heartbeats")
    steps = value(scrape(ctl), "pipeserve_controller_reconcile_seconds_count")
    wait_for(lambda: value(scrape(ctl), "pipeserve_controller_reconcile_seconds_count") > steps,
             what="a reconcile step")
    after = scrape_all(cluster)

    def moved(proc: str, name: str, **labels) -> float:
        return value(after[proc], name, **labels) - value(before[proc], name, **labels)

    # the front door: every OK answer counted once, with its end-to-end latency
    fd = "router-a"
    assert moved(fd, "pipeserve_frontdoor_requests_total", outcome="ok") == ok
    assert moved(fd, "pipeserve_frontdoor_latency_seconds_count") == ok
    assert moved(fd, "pipeserve_frontdoor_received_total") >= ok
    # each stage's router: one query per request at a (the page), one at b (its one region)
    for task in ("a", "b"):
        r = f"router-{task}"
        assert moved(r, "pipeserve_router_queries_total", task=task, outcome="ok") >= ok
        assert moved(r, "pipeserve_router_stage_seconds_count", task=task) >= ok
        assert moved(r, "pipeserve_router_route_seconds_count", task=task) >= ok
        assert value(after[r], "pipeserve_router_plan_version", task=task) >= 1
    # workers: the queries they ran, in batches, on the planned model
    for task in ("a", "b"):
        w = f"worker-{task}-0"
        wid = f"{task}-0"
        assert moved(w, "pipeserve_worker_queries_total", worker=wid, outcome="ok") >= ok
        batches = moved(w, "pipeserve_worker_batch_size_count", worker=wid)
        assert 1 <= batches <= moved(w, "pipeserve_worker_batch_size_sum", worker=wid)
        assert moved(w, "pipeserve_worker_batch_seconds_count", worker=wid) == batches
        assert value(after[w], "pipeserve_worker_state", worker=wid, state="serving") == 1
        assert value(after[w], "pipeserve_worker_model", worker=wid, variant=f"echo_{task}") == 1
        assert value(after[w], "pipeserve_worker_model_load_seconds_count", worker=wid) >= 1
        assert value(after[w], "pipeserve_worker_plan_version", worker=wid) >= 1
        assert value(after[w], "pipeserve_worker_queue_length", worker=wid) >= 0
    # the controller: heartbeats and reconcile steps flow, the planner solved, both workers serve
    c = "controller"
    assert moved(c, "pipeserve_controller_heartbeats_total") > 0
    assert moved(c, "pipeserve_controller_reconcile_seconds_count") > 0
    assert value(after[c], "pipeserve_controller_solve_seconds_count") >= 1
    assert value(after[c], "pipeserve_controller_plan_version") >= 1
    assert value(after[c], "pipeserve_controller_workers", state="serving") == 2
    assert value(after[c], "pipeserve_controller_plan_workers") == 2
    assert value(after[c], "pipeserve_controller_plan_capacity_qps") > 0
    # everything exported is a documented name (docs/metrics.md lists metric_names())
    exported = {n for samples in after.values() for n, _ in samples}
    assert exported <= metric_names(), exported - metric_names()


def test_the_endpoint_speaks_mutual_tls_with_the_service_certificate(tmp_path):
    """Under mutual TLS the endpoint serves HTTPS with the service's certificate and
    refuses a client without a certificate of the cluster's CA."""
    pki = make_dev_pki(tmp_path / "pki")
    server = serve_metrics(0, "127.0.0.1", TlsConfig(pki.service_cert, pki.service_key, pki.ca,
                                                      require_client_cert=True))
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert server.url.startswith("https://")
        scrape(f"127.0.0.1:{server.port}", ctx)   # answers (200, parses)
        bare = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            scrape(f"127.0.0.1:{server.port}", bare)
    finally:
        server.close()
