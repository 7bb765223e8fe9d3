"""`pipeserve status` against a real cluster (the echo pipeline: Redis, the controller on an
operator plan, one worker per stage, two routers), and what the load report says when a
stage loses its worker."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.echo.model import write_identity_model
from services.loadgen.report import format_report
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.tools.cluster import ClusterConfig, LocalCluster

from echo_support import PLAN, SPEC, png

ROOT = Path(__file__).resolve().parents[2]


PAGES = [LoadPage(f"p{i}", png(16 + i, i)) for i in range(4)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    write_identity_model(tmp / "models" / "echo" / "identity.onnx")
    (tmp / "plan.yaml").write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=tmp / "plan.yaml", models=tmp / "models",
                                   log_dir=tmp / "logs", heartbeat_timeout_s=3.0))
    c.start(ready_timeout_s=90)
    yield c
    c.stop()


def status(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("PIPESERVE_")}
    return subprocess.run([sys.executable, "-m", "services.tools.cli", "status", "--controller",
                           cluster.controller_address, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def load(cluster: LocalCluster, rate: float, duration: float):
    cfg = LoadConfig(target=cluster.front_door, pipeline="echo", rate=rate, duration_s=duration,
                     slo_ms=1000.0, progress=False)
    return asyncio.run(run_load(cfg, PAGES, cer_fn=None))


def wait_for(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_status_shows_the_plan_the_workers_and_the_requests(cluster):
    report = load(cluster, rate=10, duration=2)
    assert report.ok == report.sent > 0

    def counted():   # the front door publishes its counters each second, the controller reads them each second
        out = status(cluster, "--json", "--redis-url", cluster.redis_url)
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        return s if s["controller"]["recent"]["frontdoor"].get("ok", 0) >= report.sent else None

    s = wait_for(counted, "the front door's counts in the controller's status")
    c = s["controller"]
    assert c["pipeline"] == "echo" and c["mode"] == "operator" and c["waiting_for_tasks"] == []
    assert [(a["task"], a["variant"], a["batch_size"], a["replicas"]) for a in c["plan"]["allocations"]] == \
        [("a", "echo_a", 8, 1), ("b", "echo_b", 8, 1)]
    assert {(w["worker_id"], w["state"]) for w in c["workers"]} == {("a-0", "serving"), ("b-0", "serving")}
    assert c["recent"]["frontdoor"]["dropped"] == 0 and c["recent"]["frontdoor"]["failed"] == 0
    assert s["redis"]["plan"]["version"] == c["plan"]["version"]          # Redis holds the same plan
    [door] = s["redis"]["frontdoors"].values()
    assert door["ok"] >= report.sent

    text = status(cluster, "--redis-url", cluster.redis_url)
    assert text.returncode == 0, text.stderr
    assert f"plan v{c['plan']['version']} (operator, controller" in text.stdout
    assert "a-0     a     serving  echo_a x8" in text.stdout
    assert "front doors (counts since each started, from Redis):" in text.stdout

    ready = status(cluster, "--wait", "30")
    assert ready.returncode == 0 and "workers (2):" in ready.stdout


def test_a_stage_without_its_worker_is_named_in_status_and_in_the_load_report(cluster):
    cluster.kill("worker-b-0")   # stage b loses its only worker (SIGKILL: no goodbye)

    def missing():
        s = json.loads(status(cluster, "--json").stdout)["controller"]
        return s if s["waiting_for_tasks"] == ["b"] else None

    s = wait_for(missing, "the controller to expire worker b-0")   # heartbeat timeout 3 s
    assert {w["worker_id"]: w["state"] for w in s["workers"]}["b-0"] == "missing"
    out = status(cluster)
    assert "waiting for a worker of task b: start one (pipeserve-worker --task b ...)" in out.stdout
    assert "b-0     b     missing" in out.stdout
    not_ready = status(cluster, "--wait", "1")
    assert not_ready.returncode == 1 and "planned workers not serving yet: b-0 (missing)" in not_ready.stderr

    report = load(cluster, rate=10, duration=1)
    assert report.ok == 0 and report.sent > 0
    text = format_report(report)
    assert "why requests failed (status: message):" in text
    assert report.failure_reasons == {
        "UNAVAILABLE: a pipeline stage is unavailable; retry later (at stage 'b')": report.sent}, text

    cluster.restart("worker-b-0")
    assert wait_for(lambda: status(cluster, "--wait", "5").returncode == 0, "worker b-0 back", 90)


def test_an_unreachable_controller_is_said_clearly(cluster):
    out = subprocess.run([sys.executable, "-m", "services.tools.cli", "status", "--controller", "127.0.0.1:1",
                          "--timeout", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "controller: NOT REACHABLE (UNAVAILABLE" in out.stdout and "--controller HOST:PORT" in out.stdout
