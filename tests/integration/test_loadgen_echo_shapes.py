"""The load generator's CLI (a real process) with a square-wave shape against the echo
pipeline's real cluster (Redis, controller, two ONNX Runtime workers, two routers), with
per-request records, the plan history (controller and Redis) and figures on.

The pages are small PNGs whose ground truth is what the echo pipeline answers for them
(``digest(png)``), so an answer's CER is 0 exactly when its bytes came back intact."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.echo.model import write_identity_model
from services.echo.processors import digest
from services.loadgen.records import read_plan_history, read_records
from services.loadgen.schedule import RateShape, shape_schedule
from services.tools.cluster import ClusterConfig, LocalCluster

from echo_support import PLAN, SPEC

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHAPE_ARGS = ["--shape", "square", "--rate", "2", "--peak-rate", "10", "--period-s", "4",
              "--duration", "8", "--seed", "5"]


def write_echo_pages(out: Path, count: int = 4) -> None:
    out.mkdir(parents=True)
    meta = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (16 + 4 * i, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        (out / f"p{i:03d}.png").write_bytes(buf.getvalue())
        meta.append({"file": f"p{i:03d}.png", "width": 16, "height": 16 + 4 * i,
                     "lines": [{"text": digest(buf.getvalue()), "box": [0, 0, 16, 0, 16, 8, 0, 8]}]})
    (out / "ground_truth.json").write_text(json.dumps({"pages": meta}))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("echo_loadgen")
    write_identity_model(tmp / "models" / "echo" / "identity.onnx")
    (tmp / "plan.yaml").write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=tmp / "plan.yaml", models=tmp / "models",
                                   log_dir=tmp / "logs"))
    c.start(ready_timeout_s=90)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


def test_square_wave_run_writes_records_plan_history_and_figures(cluster, tmp_path):
    write_echo_pages(tmp_path / "pages")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "services.loadgen.main", "--target", cluster.front_door,
           "--pipeline", "echo", "--pages", str(tmp_path / "pages"), *SHAPE_ARGS,
           "--slo-ms", "5000", "--quiet",
           "--controller", cluster.controller_address, "--redis-url", cluster.redis_url,
           "--json", str(out / "report.json"), "--records", str(out / "records.jsonl"),
           "--plan-history", str(out / "plans.json"), "--figures", str(out / "fig")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    records = read_records(out / "records.jsonl")

    # every scheduled request: one record, one outcome, at its scheduled time
    expected = shape_schedule(RateShape("square", rate=2, peak_rate=10, period_s=4), 8.0, seed=5)
    assert report["sent"] == len(records) == len(expected) > 0
    assert [r["index"] for r in records] == list(range(len(records)))
    assert [r["scheduled_s"] for r in records] == pytest.approx([a.t_s for a in expected], abs=1e-6)
    assert all(r["outcome"] for r in records)
    assert sum(r["ok"] for r in records) == report["ok"] > 0
    for r in records:
        if r["ok"]:   # the bytes came back through both stages, latency from the schedule
            assert r["cer"] == 0.0 and r["variant_path"] == "echo_a/echo_b"
            assert r["sent_s"] >= r["scheduled_s"] and r["latency_ms"] >= r["send_lag_ms"]
        else:
            assert r["message"] or r["outcome"].startswith("CLIENT_"), r

    # the plan history: sampled from the controller, the operator plan's two workers
    plans = read_plan_history(out / "plans.json")
    assert plans == report["plan_history"] and len(plans) >= 3
    good = [s for s in plans if "error" not in s]
    assert good, plans
    assert all(s["from"] == "controller" for s in good)
    assert all(s["workers"] == {"a/echo_a": 1, "b/echo_b": 1} and s["parked"] == 0 for s in good)
    assert all(s["version"] >= 1 for s in good)

    assert sorted(p.name for p in (out / "fig").iterdir()) == sorted(
        ["load.png", "latency_cdf.png", "violations_accuracy.png", "variant_mix.png", "workers.png"])
    assert "plan samples" in proc.stdout and "send lag" in proc.stdout
    assert time.monotonic() - t0 < 120


def test_plan_history_from_redis_alone(cluster, tmp_path):
    write_echo_pages(tmp_path / "pages", count=1)
    cmd = [sys.executable, "-m", "services.loadgen.main", "--target", cluster.front_door,
           "--pipeline", "echo", "--pages", str(tmp_path / "pages"), "--rate", "2",
           "--duration", "2", "--quiet", "--redis-url", cluster.redis_url,
           "--plan-history", str(tmp_path / "plans.json"), "--records", str(tmp_path / "r.csv")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plans = read_plan_history(tmp_path / "plans.json")
    assert plans and all(s.get("from") == "redis" for s in plans), plans
    assert plans[0]["workers"] == {"a/echo_a": 1, "b/echo_b": 1}
    assert len(read_records(tmp_path / "r.csv")) > 0
