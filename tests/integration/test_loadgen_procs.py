"""``pipeserve-loadgen --procs 2`` (a real CLI process and two spawned sender processes)
against the echo pipeline's real cluster: the union of what the senders sent is exactly
the single-process schedule, each request with one outcome, the report adds up and the
plan history is sampled as usual.
Ctrl-C on the CLI stops its sender processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.loadgen.records import read_records
from services.loadgen.schedule import poisson_schedule

from test_loadgen_echo_shapes import cluster, write_echo_pages  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli(cluster, pages: Path, *extra: str) -> list[str]:   # noqa: F811
    return [sys.executable, "-m", "services.loadgen.main", "--target", cluster.front_door,
            "--pipeline", "echo", "--pages", str(pages), "--slo-ms", "5000", "--quiet", *extra]


def test_two_sender_processes_send_the_whole_schedule_once(cluster, tmp_path):   # noqa: F811
    write_echo_pages(tmp_path / "pages")
    out = tmp_path / "run"
    cmd = _cli(cluster, tmp_path / "pages", "--procs", "2", "--rate", "30", "--duration", "3",
               "--seed", "11", "--json", str(out / "report.json"), "--records", str(out / "r.jsonl"),
               "--redis-url", cluster.redis_url)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    records = read_records(out / "r.jsonl")

    expected = poisson_schedule(30.0, 3.0, seed=11)
    assert report["config"]["procs"] == 2
    assert report["sent"] == len(records) == len(expected) > 20
    assert [r["index"] for r in records] == list(range(len(expected)))
    assert [r["scheduled_s"] for r in records] == pytest.approx([a.t_s for a in expected], abs=1e-6)
    counted = (report["ok"] + report["dropped"] + report["shed"] + report["invalid"]
               + sum(report["errors"].values()))
    assert counted == report["sent"]
    assert sum(r["ok"] for r in records) == report["ok"] > 0
    assert report["on_time"] + report["late"] == report["ok"]
    for r in records:
        assert r["outcome"]
        if r["ok"]:   # CER from the senders' answers, computed in the parent: bytes intact
            assert r["cer"] == 0.0 and r["variant_path"] == "echo_a/echo_b"
            assert r["sent_s"] >= r["scheduled_s"] and r["latency_ms"] >= r["send_lag_ms"]
    lags = sorted(r["send_lag_ms"] for r in records if r["send_lag_ms"] is not None)
    assert report["send_lag_p50_ms"] <= lags[-1]       # the lag percentiles merge the senders'
    assert "send lag" in proc.stdout
    # the plan history, sampled by the CLI's own process while the senders send
    plans = report["plan_history"]
    assert len(plans) >= 2 and all(s.get("from") == "redis" for s in plans), plans
    assert plans[0]["workers"] == {"a/echo_a": 1, "b/echo_b": 1}


def _descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        todo.extend(kids - found)
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# The CLI as a terminal's foreground job has it: SIGINT at its default. A shell starts
# background jobs with SIGINT ignored, Python then keeps it ignored, and the test suite may
# well run as one (`bash .ci/run &`): the CLI would never see the Ctrl-C.
FOREGROUND = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'pipeserve-loadgen'; "
              "runpy.run_module('services.loadgen.main', run_name='__main__', alter_sys=True)")


def test_ctrl_c_stops_the_sender_processes(cluster, tmp_path):   # noqa: F811
    write_echo_pages(tmp_path / "pages", count=1)
    cmd = _cli(cluster, tmp_path / "pages", "--procs", "2", "--rate", "5", "--duration", "600")
    assert cmd[1:3] == ["-m", "services.loadgen.main"]
    proc = subprocess.Popen([cmd[0], "-c", FOREGROUND, *cmd[3:]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        senders: set[int] = set()
        end = time.monotonic() + 60
        while len(senders) < 2 and time.monotonic() < end:   # both senders spawned
            senders = {p for p in _descendants(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()}
            time.sleep(0.2)
        assert len(senders) >= 2, "the sender processes did not start"
        time.sleep(3.0)                      # they are sending now
        os.kill(proc.pid, signal.SIGINT)     # Ctrl-C, to the CLI alone
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    err = proc.stderr.read()
    assert "interrupted (Ctrl-C) before the run ended: no report" in err and "Traceback" not in err, err
    end = time.monotonic() + 10
    while any(_alive(p) for p in senders) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(_alive(p) for p in senders), "sender processes outlived Ctrl-C"
