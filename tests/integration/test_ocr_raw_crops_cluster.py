"""Raw crops end to end: the OCR pipeline with ``crop_format: raw`` on real processes
(embedded Redis, controller, a det and a rec worker, routers, the front door; real models).
The det worker's crops travel as raw tensors through the routers over gRPC, and every page
reads exactly as the in-process reference path with the same settings reads it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common import oip
from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import load_spec
from services.gen import inference_pb2_grpc as ipb_grpc
from services.ocr.local import run_ocr_page
from services.tools.cluster import ClusterConfig, LocalCluster

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"
PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6small_320, batch_size: 1, replicas: 1}
  - {task: rec, variant: rec_v6tiny, batch_size: 8, replicas: 1}
"""


@pytest.fixture(scope="module")
def raw_spec():
    """The shipped pipeline, which sends raw crops (pipelines/ocr.yaml's det settings)."""
    text = SPEC.read_text()
    assert text.count("crop_format: raw") == 1 and "crop_format: jpeg" not in text, \
        "the det settings no longer say crop_format: raw: update this test"
    return SPEC


@pytest.fixture(scope="module")
def cluster(models_dir, raw_spec, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rawcrops")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=raw_spec, plan_file=plan, models=models_dir,
                                   workers={"det": 1, "rec": 1}, log_dir=tmp / "logs", heartbeat_timeout_s=3.0))
    c.start(ready_timeout_s=120)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


def test_raw_crops_through_the_cluster_read_as_the_reference(cluster, raw_spec, models_dir, eval_pages):
    spec = load_spec(raw_spec)
    stages = []
    for name in ("det_v6small_320", "rec_v6tiny"):
        proc = make_processor(spec.variant(name), models_dir, spec.plugins)
        stages += [proc, create_session(proc.model_path, prefer_gpu=False)[0]]
    assert stages[0].crop_format == "raw"
    _, pages = eval_pages
    with grpc.insecure_channel(cluster.front_door) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        for page in pages[:4]:
            resp = stub.ModelInfer(oip.build_image_request("ocr", page.png), timeout=30.0)
            assert oip.read_parameters(resp.parameters)["variant_path"] == "det_v6small_320/rec_v6tiny"
            lines = oip.parse_ocr_response(resp)
            want = run_ocr_page(page.png, *stages, rec_batch=8)
            assert len(lines) == len(want) > 0
            assert [ln.text for ln in lines] == [text for text, _, _ in want]
            assert np.abs(np.array([ln.points for ln in lines]) - np.array([p for _, p, _ in want])).max() <= 0.1
