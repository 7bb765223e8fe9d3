"""TLS, mutual TLS and Redis authentication with real parts: certificates made by the
openssl tool, a password-protected redis-server, and the whole cluster as separate
processes serving real OCR models over mutual TLS on every hop."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import oip
from services.common.grpc_utils import TlsConfig, make_sync_channel
from services.common.redis_server import RedisServer
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.loadgen.schedule import Arrival
from services.ocr.cer import page_cer
from services.tools.cluster import ClusterConfig, LocalCluster
from services.tools.devcerts import make_dev_pki

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "ocr.yaml"
PASSWORD = "s3cret-pw:with@odd/chars"
PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6small_480, batch_size: 2, replicas: 1}
  - {task: rec, variant: rec_v6tiny, batch_size: 16, replicas: 1}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory):
    """Another CA's certificates: valid, but not trusted by the cluster."""
    return make_dev_pki(tmp_path_factory.mktemp("rogue-pki"), ca_name="someone else's CA")


@pytest.fixture(scope="module")
def redis():
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory, pki, redis):
    tmp = tmp_path_factory.mktemp("tls-cluster")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN)
    tls = TlsConfig(pki.service_cert, pki.service_key, pki.ca, require_client_cert=True)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models_dir,
                                   workers={"det": 1, "rec": 1}, log_dir=tmp / "logs",
                                   redis_url=redis.url, tls=tls))
    c.start(ready_timeout_s=120)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


@pytest.fixture()
def client_tls(pki):
    """The load generator's identity: the client certificate, trusting the cluster's CA."""
    return TlsConfig(pki.client_cert, pki.client_key, pki.ca)


def _status(channel: grpc.Channel, timeout: float = 5.0) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_an_ocr_page_goes_through_the_front_door_over_mutual_tls(cluster, client_tls, eval_pages):
    _, pages = eval_pages
    page = pages[0]
    with make_sync_channel(cluster.front_door, client_tls,
                           options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelReady(ipb.ModelReadyRequest(name="ocr"), timeout=5).ready
        resp = stub.ModelInfer(oip.build_image_request("ocr", page.png), timeout=20)
    lines = oip.parse_ocr_response(resp)
    assert len(lines) >= 0.8 * len(page.lines), "the detector lost many lines"
    truth = " ".join(ln.text for ln in page.lines)
    assert sum(ln.text in truth for ln in lines) >= 0.8 * len(lines), ([ln.text for ln in lines], truth)
    assert page_cer([(ln.text, ln.points) for ln in lines], page.lines) < 0.1
    assert oip.read_parameters(resp.parameters)["variant_path"] == "det_v6small_480/rec_v6tiny"


def test_the_load_generator_speaks_mutual_tls(cluster, client_tls, eval_pages):
    _, pages = eval_pages
    load_pages = [LoadPage(f"p{i}", p.png, p.lines) for i, p in enumerate(pages[:3])]
    config = LoadConfig(target=cluster.front_door, rate=1.0, duration_s=1.0, slo_ms=1500,
                        progress=False, tls=client_tls)
    report = asyncio.run(run_load(config, load_pages, schedule=[Arrival(0.0), Arrival(0.05), Arrival(0.1)],
                                  cer_fn=page_cer)).to_dict()
    assert report["sent"] == 3 and report["ok"] == 3, report
    assert report["mean_cer"] < 0.1
    assert report["config"]["tls"] == "tls"


TRITON_TLS_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tc
url, png, ca, cert, key = sys.argv[1:]
client = tc.InferenceServerClient(url, ssl=True, root_certificates=ca, private_key=key,
                                  certificate_chain=cert)
inp = tc.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(png, "rb").read()], dtype=object))
res = client.infer("ocr", [inp])
print(json.dumps({"ready": client.is_model_ready("ocr"),
                  "texts": [t.decode() for t in res.as_numpy("text")]}))
"""


def test_tritonclient_calls_the_front_door_over_mutual_tls(cluster, pki, eval_pages):
    # the recipe of docs/security.md; a child process (its protos clash with ours)
    pages_dir, pages = eval_pages
    out = subprocess.run([sys.executable, "-c", TRITON_TLS_CLIENT, cluster.front_door,
                          str(pages_dir / "p001.png"), str(pki.ca), str(pki.client_cert),
                          str(pki.client_key)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["ready"] and len(got["texts"]) >= 0.8 * len(pages[1].lines)


def test_plaintext_clients_are_refused_by_every_server(cluster):
    servers = {"front door": cluster.front_door, "controller": cluster.controller_address,
               **{p.name: p.address for p in cluster.procs.values() if p.address}}
    assert {"worker-det-0", "worker-rec-0", "router-rec"} <= set(servers)
    for name, address in servers.items():
        with grpc.insecure_channel(address) as ch:
            assert _status(ch) == grpc.StatusCode.UNAVAILABLE, f"{name} answered plaintext"
        with cluster.channel(address) as ch:   # the same call with the cluster's TLS works
            assert _status(ch) in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED), name


def test_tls_clients_without_a_trusted_certificate_are_refused(cluster, pki, rogue_pki, client_tls):
    refused = {
        "no client certificate": TlsConfig(ca=pki.ca),
        "certificate from another CA": TlsConfig(rogue_pki.client_cert, rogue_pki.client_key, pki.ca),
        "does not trust the cluster's CA": TlsConfig(pki.client_cert, pki.client_key, rogue_pki.ca),
    }
    for address in (cluster.front_door, cluster.procs["worker-rec-0"].address):
        for why, tls in refused.items():
            with make_sync_channel(address, tls) as ch:
                assert _status(ch) == grpc.StatusCode.UNAVAILABLE, f"{address}: {why}"
        with make_sync_channel(address, client_tls) as ch:
            assert _status(ch) == grpc.StatusCode.OK


def test_the_controller_requires_mutual_tls_for_its_rpcs(cluster, pki, client_tls):
    with make_sync_channel(cluster.controller_address, TlsConfig(ca=pki.ca)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with make_sync_channel(cluster.controller_address, client_tls) as ch:
        assert '"det_v6small_480"' in pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5).plan_json


def test_the_redis_password_stays_out_of_logs_and_command_lines(cluster, redis):
    assert PASSWORD not in redis.url and ":s3cret-pw%3Awith%40odd%2Fchars@" in redis.url
    for proc in cluster.procs.values():
        cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().decode(errors="replace")
        assert "s3cret" not in cmdline, f"{proc.name}: password on the command line"
        log = proc.log_path.read_text(errors="replace")
        assert "s3cret" not in log, f"{proc.name} logged the Redis password"
        assert "tls=mtls" in log, f"{proc.name}: {log[-2000:]}"
    controller_log = cluster.procs["controller"].log_path.read_text()
    assert f"redis://:***@127.0.0.1:{redis.port}/0" in controller_log


def _spawn(module: str, args: list[str], redis_url: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESERVE_TLS")}
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def test_wrong_redis_credentials_fail_fast_with_a_clear_error(redis, models_dir, tmp_path):
    wrong = f"redis://:not-the-password@127.0.0.1:{redis.port}/0"
    missing = f"redis://127.0.0.1:{redis.port}/0"
    runs = {
        "controller": ("services.controller.main",
                       ["--spec", str(SPEC), "--plan-file", str(ROOT / "plans" / "ocr-demo.yaml"),
                        "--port", "0"], wrong, "invalid username-password pair"),
        "router": ("services.router.main", ["--spec", str(SPEC), "--task", "rec"], wrong,
                   "invalid username-password pair"),
        "worker": ("services.worker.main", ["--spec", str(SPEC), "--task", "rec", "--controller",
                                            "127.0.0.1:1", "--models", str(models_dir)],
                   missing, "Authentication required"),
    }
    procs = {name: _spawn(module, args, url, tmp_path / f"{name}.log")
             for name, (module, args, url, _) in runs.items()}
    t0 = time.monotonic()
    try:
        codes = {name: p.wait(timeout=60) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert time.monotonic() - t0 < 30, "a wrong password must not hang"
    for name, (_, _, url, message) in runs.items():
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert codes[name] == 2, f"{name}: exit {codes[name]}; log:\n{log[-2000:]}"
        assert "redis_auth_failed" in log and message in log, log[-2000:]
        assert "not-the-password" not in log and "Traceback" not in log, log[-2000:]
        assert f"127.0.0.1:{redis.port}" in log
