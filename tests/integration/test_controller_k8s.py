"""The controller process as deploy/k8s runs it: its gRPC health service answers SERVING
(the Kubernetes gRPC probes' target), and ``--k8s-scale-deployment`` without a usable
Kubernetes client or credentials stops it at once with a clear error, leaving nothing
running (no cluster here: the scaler's API calls are unit-tested against a fake,
tests/unit/test_scaler.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
BASE = [sys.executable, "-m", "services.controller.main", "--spec", "pipelines/ocr.yaml",
        "--plan-file", "plans/ocr-demo.yaml", "--host", "127.0.0.1"]
TIMEOUT_S = 60.0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}   # the embedded Redis
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):   # not in a cluster
        env.pop(var, None)
    env["HOME"] = "/nonexistent"   # no ~/.kube/config either
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_controller_health_is_serving_for_the_grpc_probe(tmp_path):
    port = _free_port()
    log = (tmp_path / "controller.log").open("w")
    proc = subprocess.Popen(BASE + ["--port", str(port)], cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline and proc.poll() is None:
                try:   # what the kubelet asks: service "" (the server as a whole)
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, (tmp_path / "controller.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "controller.log").read_text()
        log.close()


def test_scaling_without_client_or_credentials_exits_at_once_and_says_why():
    try:
        import kubernetes  # noqa: F401
        expected = "no Kubernetes credentials"
    except ImportError:
        expected = "pipeserve[k8s]"
    out = subprocess.run(BASE + ["--port", "0", "--k8s-scale-deployment", "worker", "--k8s-namespace", "ns"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "worker_scaling_unavailable" in text and expected in text, text
    assert "Traceback" not in text
    assert "embedded_redis_started" not in text   # checked before anything was started


@pytest.mark.parametrize("flags", [["--k8s-min", "3", "--k8s-max", "2"], ["--k8s-spare", "-1"]])
def test_bad_scaler_flags_are_usage_errors(flags):
    out = subprocess.run(BASE + ["--k8s-scale-deployment", "worker"] + flags, cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2 and "--k8s-*" in out.stderr, out.stderr
