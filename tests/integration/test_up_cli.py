"""`pipeserve up` refuses clearly what cannot work, before it starts anything. (Starting
and stopping the whole cluster with it is tests/integration/test_readme.py's job: the
README's first command.)"""
from __future__ import annotations

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
