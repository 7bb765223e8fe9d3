"""Triton's tools against the echo pipeline's front door, as real processes: perf_analyzer
(the real binary of the tritonclient 2.51.0 wheel, `make perf-tools`) reads the model's
metadata and config, measures at concurrency 1 and 4 (unary calls) and 4 over
ModelStreamInfer, and reads the server's statistics before and after each measurement;
tritonclient's Python client uses the same Triton extensions.

Not skipped when the binary is missing: `make test` installs it, and a missing one fails
with what to run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import grpc
import pytest

from services.echo.model import write_identity_model
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.tools.cluster import ClusterConfig, LocalCluster
from services.tools.perf_analyzer import (PerfAnalyzerMissing, find_perf_analyzer, read_csv_report,
                                          write_input_data)

from echo_support import PLAN, SPEC, png

REQUESTS = 200   # per measurement: a second or two on a quiet 2-core machine


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return find_perf_analyzer()
    except PerfAnalyzerMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perf")
    models = tmp / "models"
    write_identity_model(models / "echo" / "identity.onnx")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models, log_dir=tmp / "logs"))
    c.start(ready_timeout_s=60)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


@pytest.fixture(scope="module")
def input_json(tmp_path_factory):
    return write_input_data(tmp_path_factory.mktemp("perf-input") / "input.json",
                            [png(24 + 8 * i, seed=i) for i in range(4)])


def statistics(cluster) -> ipb.ModelStatistics:
    with grpc.insecure_channel(cluster.front_door) as ch:
        [stats] = ipb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            ipb.ModelStatisticsRequest(name="echo"), timeout=10).model_stats
    return stats


def field(report: str, section: str, name: str) -> float:
    """A number of perf_analyzer's text report: ``name: <number>`` within ``section``
    ("Client:" or "Server:")."""
    part = report.split(section, 1)[1]
    m = re.search(rf"{re.escape(name)}: ([0-9.]+)", part)
    assert m, f"no {name!r} under {section!r} in:\n{report}"
    return float(m.group(1))


@pytest.mark.parametrize("concurrency, streaming", [(1, False), (4, False), (4, True)])
def test_perf_analyzer_measures_the_front_door(perf_analyzer, cluster, input_json, tmp_path,
                                               concurrency, streaming):
    before = statistics(cluster)
    csv_path = tmp_path / "report.csv"
    args = ["--concurrency-range", str(concurrency), "--request-count", str(REQUESTS),
            "-f", str(csv_path), *(["--streaming"] if streaming else [])]
    t0 = time.monotonic()
    out = perf_analyzer.run(cluster.front_door, "echo", input_json, args, timeout_s=240)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-4000:]
    assert "error" not in report.lower(), report[-4000:]
    # the client's side: every request answered, at the concurrency asked for
    [row] = read_csv_report(csv_path)
    assert row["Concurrency"] == concurrency
    assert row["Inferences/Second"] > 0 and row["p99 latency"] >= row["p50 latency"] > 0
    assert field(report, "Client:", "Request count") == REQUESTS
    # the server's side, from ModelStatistics before and after: it counted what was sent
    assert field(report, "Server:", "Successful request count") == REQUESTS
    assert field(report, "Server:", "Inference count") == REQUESTS
    m = re.search(r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
                  r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)",
                  report)
    assert m, report[-4000:]
    total, *parts = map(int, m.groups())
    assert total > 0 and int(parts[4]) > 0 and sum(parts) <= total + 5   # its parts add up
    # and the front door's statistics moved by exactly the measurement, no failures
    after = statistics(cluster)
    elapsed_ns = (time.monotonic() - t0) * 1e9
    sent = after.inference_stats.success.count - before.inference_stats.success.count
    assert sent == REQUESTS
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    busy_ns = after.inference_stats.success.ns - before.inference_stats.success.ns
    assert 0 < busy_ns <= concurrency * elapsed_ns


TRITON_CLIENT = """
import json, queue, sys
import numpy as np
import tritonclient.grpc as tc
url, png_path = sys.argv[1], sys.argv[2]
client = tc.InferenceServerClient(url=url)
config = client.get_model_config("echo", as_json=True)["config"]
stats = client.get_inference_statistics("echo", as_json=True)
index = client.get_model_repository_index(as_json=True)
inp = tc.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(png_path, "rb").read()], dtype=object))
only_text = client.infer("echo", [inp], outputs=[tc.InferRequestedOutput("text")])
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
client.async_stream_infer("echo", [inp], request_id="s1")
client.async_stream_infer("nope", [inp], request_id="s2")
client.async_stream_infer("echo", [inp], request_id="s3")
got = [answers.get(timeout=30) for _ in range(3)]
client.stop_stream()
print(json.dumps({
    "config": config, "stats": stats, "index": index,
    "outputs": [o.name for o in only_text.get_response().outputs],
    "stream_ok": sorted(r.get_response().id for r, e in got if e is None),
    "stream_errors": [str(e) for r, e in got if e is not None],
}))
"""


def test_tritonclient_uses_the_triton_extensions(cluster, tmp_path):
    """tritonclient (a child process: its protos clash with ours in one process) reads the
    config, statistics and repository index, gets only the output it asks for, and streams."""
    image = tmp_path / "page.png"
    image.write_bytes(png(32, seed=9))
    out = subprocess.run([sys.executable, "-c", TRITON_CLIENT, cluster.front_door, str(image)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    config = got["config"]
    assert config["name"] == "echo" and config.get("max_batch_size", 0) == 0
    assert [i["name"] for i in config["input"]] == ["image"]
    assert [o["name"] for o in config["output"]] == ["text", "boxes", "confidence"]
    [model_stats] = got["stats"]["model_stats"]
    assert model_stats["name"] == "echo" and model_stats["version"] == "1"
    assert int(model_stats["inference_stats"]["success"]["count"]) >= 1
    assert got["index"]["models"] == [{"name": "echo", "version": "1", "state": "READY"}]
    assert got["outputs"] == ["text"]
    assert got["stream_ok"] == ["s1", "s3"]
    [error] = got["stream_errors"]
    assert "NOT_FOUND" in error and "nope" in error
