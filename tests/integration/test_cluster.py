"""The whole system as separate processes: embedded Redis, controller, workers and one
router per stage, answering OIP v2 requests with real OCR models."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.tools.cluster import ClusterConfig, LocalCluster
from services.common import oip
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.ocr.cer import page_cer

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"

PLAN_480 = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6small_480, batch_size: 2, replicas: 1}
  - {task: rec, variant: rec_v6tiny, batch_size: 16, replicas: 2}
"""
PLAN_320 = PLAN_480.replace("det_v6small_480", "det_v6small_320")


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN_480)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models_dir,
                                   workers={"det": 1, "rec": 2}, log_dir=tmp / "logs",
                                   heartbeat_timeout_s=3.0, metrics=True))
    c.start(ready_timeout_s=120)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


@pytest.fixture()
def stub(cluster):
    with grpc.insecure_channel(cluster.front_door, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ipb_grpc.GRPCInferenceServiceStub(ch)


def infer(stub, image: bytes, timeout: float = 10.0, **kw):
    return stub.ModelInfer(oip.build_image_request("ocr", image, **kw), timeout=timeout)


def test_pages_are_read_with_low_cer(stub, eval_pages):
    _, pages = eval_pages
    cers = []
    for page in pages[:8]:
        resp = infer(stub, page.png)
        lines = oip.parse_ocr_response(resp)
        assert len(lines) >= 0.8 * len(page.lines), "the detector lost many lines"
        cers.append(page_cer([(ln.text, ln.points) for ln in lines], page.lines))
        params = oip.read_parameters(resp.parameters)
        assert params["plan_version"] >= 1
        assert params["variant_path"] == "det_v6small_480/rec_v6tiny"
    assert float(np.mean(cers)) < 0.1, cers


def test_timing_parameter_returns_the_latency_breakdown_and_the_phases_are_scraped(cluster, stub, eval_pages):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from services.router.stats import PHASES

    _, pages = eval_pages
    for page in pages[:2]:
        t0 = time.perf_counter()
        resp = infer(stub, page.png, timing=True)
        client_ms = (time.perf_counter() - t0) * 1e3
        params = oip.read_parameters(resp.parameters)
        times = json.loads(params["timing"])
        phases = times["phases_ms"]
        assert set(phases) == set(PHASES)
        assert all(v >= 0 for v in phases.values()), phases
        assert times["unaccounted_ms"] >= 0
        # the work itself was measured: the detector and the recogniser ran a model each
        assert phases["model"] > 0 and phases["preprocess"] > 0 and phases["crop_encode"] > 0
        assert [s["task"] for s in times["stages"]] == ["det", "rec"]
        assert sum(phases.values()) <= client_ms, (times, client_ms)
        assert times["total_ms"] <= client_ms, (times, client_ms)
    assert "timing" not in oip.read_parameters(infer(stub, pages[0].png).parameters)
    with urllib.request.urlopen(f"http://{cluster.metrics_addresses['router-det']}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {s.labels["phase"]: s.value for fam in text_string_to_metric_families(text)
              for s in fam.samples if s.name == "pipeserve_frontdoor_phase_seconds_count"}
    assert set(counts) == set(PHASES) | {"unaccounted"}
    assert min(counts.values()) >= 3   # these three requests at least, every phase of each


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tc
url, png_path = sys.argv[1], sys.argv[2]
client = tc.InferenceServerClient(url=url)
meta = client.get_model_metadata("ocr")
inp = tc.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(png_path, "rb").read()], dtype=object))
result = client.infer("ocr", [inp], outputs=[tc.InferRequestedOutput("text"), tc.InferRequestedOutput("boxes")])
print(json.dumps({
    "live": client.is_server_live(), "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("ocr"), "inputs": [i.name for i in meta.inputs],
    "texts": [t.decode() for t in result.as_numpy("text")],
    "boxes_shape": list(result.as_numpy("boxes").shape),
}))
"""


def test_tritonclient_can_call_the_front_door(cluster, eval_pages):
    # tritonclient registers its own copy of the `inference` protos, which clash with ours
    # in one process's descriptor pool: it runs as a separate client program, as users do.
    pages_dir, pages = eval_pages
    out = subprocess.run([sys.executable, "-c", TRITON_CLIENT, cluster.front_door,
                          str(pages_dir / "p000.png")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["inputs"] == ["image"]
    texts = got["texts"]
    assert got["boxes_shape"] == [len(texts), 8] and len(texts) >= 0.8 * len(pages[0].lines)
    truth = " ".join(ln.text for ln in pages[0].lines)
    assert sum(t in truth for t in texts) >= 0.8 * len(texts), (texts, truth)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_bad_inputs_get_clear_codes(stub, eval_pages):
    _, pages = eval_pages
    png = pages[0].png
    code, msg = _code(lambda: stub.ModelInfer(oip.build_image_request("nope", png), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    bad = oip.build_image_request("ocr", png)
    bad.inputs[0].datatype = "FP32"
    code, msg = _code(lambda: stub.ModelInfer(bad, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "datatype" in msg.lower()
    bad = oip.build_image_request("ocr", png)
    bad.inputs[0].shape[:] = [2]
    assert _code(lambda: stub.ModelInfer(bad, timeout=5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # a PNG header with a cut-off body: the header check passes, the worker cannot decode it
    code, msg = _code(lambda: infer(stub, png[:2000]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    code, msg = _code(lambda: infer(stub, b"this is not an image"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    huge = b"\x89PNG\r\n\x1a\n" + b"\0" * (9 * 1024 * 1024)   # over the spec's 8 MiB limit
    code, msg = _code(lambda: infer(stub, huge))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg
    # a deadline the pipeline cannot make: dropped explicitly, not hung
    code, msg = _code(lambda: infer(stub, png, timeout_ms=2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, msg
    # the server still answers normally afterwards
    assert oip.parse_ocr_response(infer(stub, png))


def _set_plan(cluster, text: str) -> int:
    with grpc.insecure_channel(cluster.controller_address) as ch:
        return pb_grpc.ControllerStub(ch).SetPlan(pb.SetPlanRequest(plan_file_json=text), timeout=10).plan_version


def test_new_plan_swaps_variant_under_load_without_losing_requests(cluster, eval_pages):
    pages_dir, pages = eval_pages
    load_pages = [LoadPage(f"p{i}", p.png, p.lines) for i, p in enumerate(pages)]
    config = LoadConfig(target=cluster.front_door, rate=2.0, duration_s=8.0, seed=3, slo_ms=1500,
                        progress=False)

    async def scenario():
        load = asyncio.create_task(run_load(config, load_pages, cer_fn=page_cer))
        await asyncio.sleep(3.0)
        version = await asyncio.to_thread(_set_plan, cluster, PLAN_320)
        report = await load
        return version, report

    version, report = asyncio.run(scenario())
    d = report.to_dict()
    assert d["sent"] >= 8
    assert d["ok"] == d["sent"], f"requests lost during the swap: {d}"
    paths = d["variant_paths"]
    assert any("det_v6small_480" in p for p in paths) and any("det_v6small_320" in p for p in paths), paths
    assert max(int(v) for v in d["plan_versions"]) >= version
    assert d["mean_cer"] < 0.1
    _set_plan(cluster, PLAN_480)   # leave the cluster as the other tests expect


def test_lost_worker_leaves_the_plan_and_requests_still_succeed(cluster, eval_pages):
    _, pages = eval_pages
    with grpc.insecure_channel(cluster.controller_address) as ch:
        ctl = pb_grpc.ControllerStub(ch)
        before = json.loads(ctl.GetPlan(pb.GetPlanRequest(), timeout=5).plan_json)
        assert {"rec-0", "rec-1"} <= set(before["workers"])
        cluster.procs["worker-rec-1"].popen.kill()
        cluster.procs.pop("worker-rec-1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            plan = json.loads(ctl.GetPlan(pb.GetPlanRequest(), timeout=5).plan_json)
            if "rec-1" not in plan["workers"]:
                break
            time.sleep(0.3)
        assert "rec-1" not in plan["workers"] and plan["version"] > before["version"]
    time.sleep(2.5)   # routers follow the plan (pub/sub, or the 2 s re-read)
    with grpc.insecure_channel(cluster.front_door) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        for page in pages[:4]:
            assert oip.parse_ocr_response(infer(stub, page.png))
