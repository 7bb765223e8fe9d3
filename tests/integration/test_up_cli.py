"""`pipeserve up` refuses clearly what cannot work, before it starts anything. (Starting
and stopping the whole cluster with it is tests/integration/test_readme.py's job: the
README's first command.)"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def up(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.tools.cli", "up", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_taken_port_is_named_and_nothing_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = up("--port", str(port), "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 2
    assert f"port {port} (--port) is in use" in out.stderr and "choose another with --port" in out.stderr
    assert not (tmp_path / "logs").exists()   # nothing was started


def test_bad_arguments_are_refused():
    out = up("--workers", "nope=1")
    assert out.returncode == 2 and "--workers expects TASK=N with a task of ['det', 'rec']" in out.stderr
    out = up("--port", "50050", "--controller-port", "50050")
    assert out.returncode == 2 and "--port and --controller-port must differ" in out.stderr


def test_up_plans_on_the_calibrated_profile_and_uses_its_pool_workers(tmp_path):
    """`pipeserve up` fits the profile to the host like the demo (here a cached probe that
    says this host is 2x slower, so the outcome does not depend on the machine) and
    `--pool 2` starts two pool workers, which the plan uses (one per stage);
    `--min-demand-qps` reaches the planner."""
    import json
    import signal
    import time

    from services.common.redis_server import free_port
    from services.gen import pipeserve_pb2 as pb
    from services.gen import pipeserve_pb2_grpc as pb_grpc
    from services.planner import load_profile
    from services.tools.calibrate import host_key

    import grpc

    cache = tmp_path / "profiles"
    cache.mkdir()
    profile = load_profile(ROOT / "profiles" / "ocr_cpu.json")
    key = host_key(profile)
    (cache / f"{profile.name}-{key}.probe.json").write_text(json.dumps(
        {"factors": {"det": 2.0, "rec": 2.0}, "samples": {}, "seconds": 1.0}))
    calibrated = cache / f"{profile.name}-{key}.json"
    port, cport = free_port(), free_port()
    out_path = tmp_path / "up.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.tools.cli", "up", "--pool", "2", "--min-demand-qps", "6",
                                 "--port", str(port), "--controller-port", str(cport),
                                 "--calibration-cache", str(cache), "--log-dir", str(tmp_path / "logs")],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while "ready in" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.5)
        text = out_path.read_text()
        assert f"does not match this host: planning on {calibrated} (det x2.00, rec x2.00)" in text, text
        assert f"plans from: the planner on {calibrated}, for at least 6.0 req/s" in text, text
        assert "2 workers (2 pool)" in text, text
        assert load_profile(calibrated).task("det").variants[0].latency_ms == {
            b: type(p)(2 * p.p50_ms, 2 * p.p95_ms)
            for b, p in profile.task("det").variants[0].latency_ms.items()}
        with grpc.insecure_channel(f"127.0.0.1:{cport}") as ch:
            plan = json.loads(pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=10).plan_json)
        assert set(plan["workers"]) == {"pool-0", "pool-1"}
        assert {w["task"] for w in plan["workers"].values()} == {"det", "rec"}
        log = (tmp_path / "logs" / "controller.log").read_text()
        assert f"profile={calibrated} " in log                                   # what it loaded
        first = float(re.search(r"planner_solved .*?demand_qps=([\d.]+)", log).group(1))
        assert first >= 6.0    # the first plan is made for the announced load, not for near-zero demand
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0 and "stopped 5 processes cleanly" in out_path.read_text(), out_path.read_text()
