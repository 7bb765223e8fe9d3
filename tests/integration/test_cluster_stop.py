"""LocalCluster.stop_proc on a process that ignores SIGTERM: after its grace time the
process's Python stacks go to its log (SIGUSR1, faulthandler, as every service registers
it), then it is SIGKILLed, and the log says so."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from services.tools.cluster import ClusterConfig, LocalCluster, Proc

from echo_support import SPEC

pytestmark = pytest.mark.integration

STUCK = """
import signal, sys, time
from services.common.logging import configure_logging
configure_logging("stuck")                       # registers the SIGUSR1 stack dump
signal.signal(signal.SIGTERM, signal.SIG_IGN)    # a service that will not stop
print("ready", flush=True)

def waiting_for_ever():
    while True:
        time.sleep(0.05)

waiting_for_ever()
"""


def test_a_process_that_ignores_sigterm_leaves_its_stacks_and_is_killed(tmp_path):
    cluster = LocalCluster(ClusterConfig(spec=SPEC, log_dir=tmp_path))
    log = tmp_path / "stuck.log"
    with open(log, "ab") as f:
        popen = subprocess.Popen([sys.executable, "-c", STUCK], stdout=f, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while "ready" not in log.read_text() and time.monotonic() < end:
        time.sleep(0.05)
    cluster.procs["stuck"] = Proc("stuck", popen, log)
    code = cluster.stop_proc("stuck", grace_s=0.5)
    assert code == -9
    text = log.read_text()
    assert "waiting_for_ever" in text                     # the stack it was stuck in
    assert "stuck did not stop within 0.5s of SIGTERM; SIGKILLed" in text
    assert "stuck (exit -9)" in cluster.exit_report({"stuck": code})
