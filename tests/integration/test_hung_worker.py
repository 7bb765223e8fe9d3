"""A hung worker (SIGSTOP for 8 s) and a dead one (SIGKILL), each with a second replica
of its stage, under steady load on real processes: at most one request fails
(docs/reliability.md, "Hung and dead workers").

The echo pipeline (pipelines/echo.yaml: two no-op ONNX Runtime stages) with an operator
plan of two replicas per stage, the real controller (5 s heartbeat timeout), Redis and
routers, and the open-loop load generator. What holds the failures down is the routers'
worker health (services/policy/health.py): a call to the stopped worker is abandoned at
its expected end + margin and the group retried on the other replica, new traffic keeps
away from a worker with a late call or an open breaker, and a refused connection is
retried on the other replica. Without it (the router sending each call the whole budget)
every request routed to the stopped worker in the 5 s before the controller re-plans
ends at its deadline.

Run with ``-s`` to see the figures (one ``hung_worker_figures`` JSON line per case).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from services.echo.model import write_identity_model
from services.echo.processors import digest
from services.loadgen import report as rep
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.tools.cluster import ClusterConfig, LocalCluster

from echo_support import SPEC, png

pytestmark = pytest.mark.integration

PLAN = """
pipeline: echo
allocations:
  - {task: a, variant: echo_a, batch_size: 8, replicas: 2}
  - {task: b, variant: echo_b, batch_size: 8, replicas: 2}
"""
RATE = 10.0          # requests/s: a fraction of what one replica per stage carries
DURATION_S = 18.0
FAULT_AT_S = 4.0
STOP_S = 8.0         # the hung worker: SIGSTOP for 8 s
SLO_MS = 1000.0      # the spec's SLO (pipelines/echo.yaml)
TERMINAL = {rep.OK, rep.DROPPED, rep.SHED, rep.INVALID, "UNAVAILABLE", "INTERNAL"}


def start(tmp_path) -> LocalCluster:
    models = tmp_path / "models"
    write_identity_model(models / "echo" / "identity.onnx")
    (tmp_path / "plan.yaml").write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=tmp_path / "plan.yaml", models=models,
                                   workers={"a": 2, "b": 2}, log_dir=tmp_path / "logs"))
    c.start(ready_timeout_s=90)
    c.wait_planned(4, 90)
    return c


def load_with_fault(cluster: LocalCluster, fault, undo=None) -> rep.LoadReport:
    """Steady Poisson load for DURATION_S; ``fault`` at FAULT_AT_S, ``undo`` STOP_S later
    (and in any case before returning)."""
    pages = [LoadPage(f"p{i}", img, digest(img)) for i, img in enumerate(png(24 + 4 * i, seed=i) for i in range(4))]
    config = LoadConfig(target=cluster.front_door, pipeline="echo", rate=RATE, duration_s=DURATION_S, seed=3,
                        slo_ms=SLO_MS, progress=False)

    async def scenario():
        t0 = time.perf_counter()
        load = asyncio.create_task(run_load(config, pages, cer_fn=lambda *_: 0.0))
        try:
            await asyncio.sleep(FAULT_AT_S)
            fault()
            if undo is not None:
                await asyncio.sleep(max(0.0, t0 + FAULT_AT_S + STOP_S - time.perf_counter()))
        finally:
            if undo is not None:
                undo()
        return await load

    return asyncio.run(scenario())


def check(name: str, report: rep.LoadReport) -> dict:
    codes = [r.code for r in report.results]
    assert len(codes) == report.sent == report.config["scheduled"]
    assert set(codes) <= TERMINAL, {c: codes.count(c) for c in set(codes) - TERMINAL}   # one answer each
    failed = [r for r in report.results if not r.ok]
    late = [r for r in report.results if r.ok and not r.on_time]
    after = [r for r in report.results if r.t_s is not None and FAULT_AT_S <= r.t_s < FAULT_AT_S + STOP_S]
    figures = {"case": name, "sent": report.sent, "failed": len(failed), "late": len(late),
               "codes": {c: codes.count(c) for c in sorted(set(codes))},
               "p50_ms": report.latency_p50_ms and round(report.latency_p50_ms, 1),
               "p99_ms": report.latency_p99_ms and round(report.latency_p99_ms, 1),
               "max_ms_in_fault_window": round(max((r.latency_s or 0.0 for r in after), default=0.0) * 1e3, 1),
               "sent_in_fault_window": len(after)}
    print("hung_worker_figures", json.dumps(figures))
    assert len(failed) <= 1, (figures, report.failure_reasons)
    return figures


@pytest.mark.parametrize("stage", ["a", "b"])
def test_a_worker_stopped_for_8_s_fails_at_most_one_request(tmp_path, stage):
    cluster = start(tmp_path)
    pid = cluster.procs[f"worker-{stage}-1"].popen.pid
    try:
        report = load_with_fault(cluster, lambda: os.kill(pid, signal.SIGSTOP),
                                 lambda: os.kill(pid, signal.SIGCONT))
    finally:
        os.kill(pid, signal.SIGCONT)
        cluster.stop()
    check(f"SIGSTOP worker-{stage}-1 for {STOP_S:g} s", report)


@pytest.mark.parametrize("stage", ["a", "b"])
def test_a_killed_worker_with_a_second_replica_fails_at_most_one_request(tmp_path, stage):
    cluster = start(tmp_path)
    try:
        report = load_with_fault(cluster, lambda: cluster.kill(f"worker-{stage}-1"))
    finally:
        cluster.stop()
    check(f"SIGKILL worker-{stage}-1", report)
