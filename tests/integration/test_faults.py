"""Faults survived, on real processes under load (docs/reliability.md, "Faults").

Each test starts its own cluster (two workers per task), drives it with the open-loop
load generator at a rate it carries, injects one fault with SIGKILL, and checks what the
architecture promises:

- every request gets exactly one terminal answer (no request is left without one);
- a dead worker fails at most the requests already on it, and the violation ratio is
  back to its pre-fault level within 10 s (the controller re-plans);
- Redis dying and coming back empty loses no request; the controller puts the plan back
  and subscribers reconnect by themselves;
- a controller killed and started again adopts the plan in Redis: no data-plane change;
- a child-stage router killed and started again: requests in flight fail explicitly, the
  front door recovers when it is back.

Run with ``-s`` to see the measured figures (one ``fault_figures`` JSON line per test).
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest

from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.loadgen import report as rep
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.tools.cluster import ClusterConfig, LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "ocr.yaml"
PROFILE = ROOT / "profiles" / "ocr_cpu.json"
SLO_S = 1.5          # the spec's SLO (pipelines/ocr.yaml)
RATE = 2.0           # requests/s: what 2 + 2 workers carry on a busy 2-core machine, with room
PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6tiny_320, batch_size: 2, replicas: 2}
  - {task: rec, variant: rec_v6tiny, batch_size: 16, replicas: 2}
"""
PLAN_B = PLAN.replace("det_v6tiny_320", "det_v6small_320")
SWAP_WINDOW_S = 3.0  # a detector swap (model load) on a busy 2-core machine, with room
# terminal answers a client can get; anything else (a client-side timeout, a request
# still pending at the end) would mean the system left a request without an answer
TERMINAL = {rep.OK, rep.DROPPED, rep.SHED, rep.INVALID, "UNAVAILABLE", "INTERNAL"}


@pytest.fixture()
def pages(eval_pages):
    _, ps = eval_pages
    return [LoadPage(f"p{i}", p.png, p.lines) for i, p in enumerate(ps)]


def start_cluster(tmp_path, models_dir, planner: bool = False, profile: Path = PROFILE,
                  spec: Path = SPEC) -> LocalCluster:
    extra: tuple[str, ...] = ()
    if planner:
        # the online calibration re-plans on its own schedule (when enough batches were
        # measured); off, so that a plan change here is the restart's (the restart keeps
        # the calibration: tests/unit/test_controller_planning.py)
        extra = ("--online-calibration", "off")
        # planned for at least 4x the offered rate: the Poisson noise of a 5 s demand
        # window at RATE stays below it, so a plan change after a restart is the restart's
        source = {"profile": profile, "min_demand_qps": RATE * 4}
    else:
        plan = tmp_path / "plan.yaml"
        plan.write_text(PLAN)
        source = {"plan_file": plan}
    c = LocalCluster(ClusterConfig(spec=spec, **source, models=models_dir, workers={"det": 2, "rec": 2},
                                   log_dir=tmp_path / "logs", heartbeat_timeout_s=3.0, controller_args=extra))
    c.start(ready_timeout_s=120)
    if not planner:
        c.wait_planned(4, 120)   # the operator plan's four replicas, before any fault
    return c


def run_with_faults(cluster: LocalCluster, pages, steps, duration_s: float = 24.0) -> rep.LoadReport:
    """Load for ``duration_s``; ``steps`` = [(seconds after the start, callable)], run
    in a thread at those times. Returns the report; ``report.fault_times`` the actual
    times (seconds from the load's start) each step ran."""
    config = LoadConfig(target=cluster.front_door, rate=RATE, duration_s=duration_s, seed=11,
                        slo_ms=SLO_S * 1000, progress=False)

    async def scenario():
        t0 = time.perf_counter()
        load = asyncio.create_task(run_load(config, pages))
        times = []
        for at, fn in steps:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            times.append(time.perf_counter() - t0)
            await asyncio.to_thread(fn)
        return await load, times

    report, times = asyncio.run(scenario())
    object.__setattr__(report, "fault_times", times)
    return report


def every_request_answered_once(report: rep.LoadReport) -> None:
    codes = [r.code for r in report.results]
    assert len(codes) == report.sent == report.config["scheduled"]
    assert set(codes) <= TERMINAL, {c: codes.count(c) for c in set(codes) - TERMINAL}


def violation(results) -> float:
    results = list(results)
    return sum(not r.on_time for r in results) / len(results) if results else 0.0


def figures(name: str, report: rep.LoadReport, fault_t: float, **extra) -> dict:
    res = report.results
    failed = [r for r in res if not r.ok]
    late = [r for r in res if r.ok and not r.on_time]
    bad = failed + late
    out = {
        "fault": name, "sent": report.sent, "failed": len(failed), "late": len(late),
        "codes": {c: sum(r.code == c for r in failed) for c in sorted({r.code for r in failed})},
        "pre_fault_violation": round(violation(r for r in res if 1.0 <= r.t_s < fault_t), 3),
        "last_violation_after_fault_s": round(max((r.t_s for r in bad), default=fault_t) - fault_t, 2),
        "p50_ms": report.latency_p50_ms and round(report.latency_p50_ms, 1),
        **extra,
    }
    print("fault_figures", json.dumps(out))
    return out


def controller(cluster: LocalCluster):
    ch = cluster.channel(cluster.controller_address)
    return ch, pb_grpc.ControllerStub(ch)


def current_plan(cluster: LocalCluster, timeout_s: float = 5.0) -> dict:
    ch, stub = controller(cluster)
    with ch:
        return json.loads(stub.GetPlan(pb.GetPlanRequest(), timeout=timeout_s).plan_json)


def test_a_killed_worker_fails_only_what_it_held_and_service_recovers(tmp_path, models_dir, pages):
    cluster = start_cluster(tmp_path, models_dir)
    try:
        before = current_plan(cluster)
        report = run_with_faults(cluster, pages, [(8.0, lambda: cluster.kill("worker-rec-1"))])
        after = current_plan(cluster)
    finally:
        cluster.stop()
    fault_t = report.fault_times[0]
    every_request_answered_once(report)
    f = figures("SIGKILL worker rec-1", report, fault_t)
    assert "rec-1" in before["workers"] and "rec-1" not in after["workers"]   # the controller re-planned
    # at most the requests already on the dead worker fail: those sent within one SLO
    # before the kill (later ones find it unreachable and are retried on rec-0)
    failed = [r for r in report.results if not r.ok]
    assert all(fault_t - SLO_S - 0.5 <= r.t_s <= fault_t + 0.5 for r in failed), \
        [(round(r.t_s - fault_t, 2), r.code) for r in failed]
    assert len(failed) <= RATE * (SLO_S + 1.0)
    # back to the pre-fault violation ratio within 10 s
    post = [r for r in report.results if r.t_s >= fault_t + 10.0]
    assert len(post) >= 8
    assert all(r.ok for r in post)
    assert violation(post) <= f["pre_fault_violation"] + 0.1, f


def test_redis_killed_and_restarted_empty_loses_no_request(tmp_path, models_dir, pages):
    cluster = start_cluster(tmp_path, models_dir)
    applied = {}
    try:
        def restart_and_set_plan():
            cluster.restart_redis()
            t = time.perf_counter()
            ch, stub = controller(cluster)
            with ch:
                applied["version"] = stub.SetPlan(pb.SetPlanRequest(plan_file_json=PLAN_B), timeout=10).plan_version
            applied["set_at"] = t

        report = run_with_faults(cluster, pages, [(6.0, cluster.kill_redis), (11.0, restart_and_set_plan)],
                                 duration_s=26.0)
        plan = current_plan(cluster)
    finally:
        cluster.stop()
    every_request_answered_once(report)
    killed_t, restarted_t = report.fault_times
    # the plan made after the restart reached the data plane: answers carry its version
    # and variant (subscribers reconnected by themselves, the controller republished).
    # Routers and workers read the plan on their own, so for about one model load a request
    # routed with it can still run on the detector being replaced (queued work runs on the
    # model it was prepared for); after that, every answer is the new plan's.
    new = [r for r in report.results if r.plan_version is not None and r.plan_version >= applied["version"]]
    assert new, "no answer carries the plan set after the restart"
    settled = [r for r in new if r.t_s > min(x.t_s for x in new) + SWAP_WINDOW_S]
    assert settled and all("det_v6small_320" in (r.variant_path or "") for r in settled), \
        [(round(r.t_s, 1), r.code, r.variant_path) for r in new]
    assert any("det_v6small_320" in (r.variant_path or "") for r in new)
    reconnect_s = min(r.t_s for r in new) - restarted_t
    f = figures("SIGKILL Redis, restart empty", report, killed_t, outage_s=round(restarted_t - killed_t, 1),
                new_plan_served_after_restart_s=round(reconnect_s, 1))
    assert plan["version"] == applied["version"] and plan["workers"]["det-0"]["variant"] == "det_v6small_320"
    assert report.ok == report.sent, f          # no request lost
    assert reconnect_s < 8.0, f                 # subscribers back off to at most 5 s


def test_a_restarted_controller_adopts_the_plan_with_no_data_plane_change(tmp_path, models_dir, pages,
                                                                          ocr_for_host):
    # planned on this host's speed (the online calibration is off here) among cheap
    # variants (two detectors, so a swap after the restart would show): on the whole
    # committed profile a host 2x slower got plans it could not carry before any fault
    spec, profile = ocr_for_host({"det": ["det_v6tiny_320", "det_v6small_320"], "rec": ["rec_v6tiny"]})
    cluster = start_cluster(tmp_path, models_dir, planner=True, profile=profile, spec=spec)
    seen = {}
    try:
        def kill():
            seen["before"] = current_plan(cluster)
            cluster.kill("controller")

        def restart():
            cluster.restart("controller")
            t = time.perf_counter()
            while True:       # the new controller answers with the adopted plan
                try:
                    seen["adopted"] = current_plan(cluster, timeout_s=1.0)
                    break
                except grpc.RpcError:
                    if time.perf_counter() - t > 30:
                        raise
                    time.sleep(0.2)
            seen["answering_after_s"] = time.perf_counter() - t

        report = run_with_faults(cluster, pages, [(6.0, kill), (9.0, restart)], duration_s=26.0)
        seen["after"] = current_plan(cluster)
    finally:
        cluster.stop()
    every_request_answered_once(report)
    killed_t, _ = report.fault_times
    before, adopted, after = seen["before"], seen["adopted"], seen["after"]
    f = figures("SIGKILL controller, restart", report, killed_t,
                answering_after_restart_s=round(seen["answering_after_s"], 1),
                versions=[before["version"], adopted["version"], after["version"]])
    assert adopted["version"] == before["version"]          # took up the plan in Redis
    assert after["version"] >= before["version"]
    # the workers that served before still run the variants they ran (the planner may add
    # or release a worker as the demand estimate moves, but the restart swaps nothing)
    kept = set(before["workers"]) & set(after["workers"])
    assert kept and all(after["workers"][w]["variant"] == before["workers"][w]["variant"] for w in kept), \
        (before["workers"], after["workers"])
    assert report.ok == report.sent, f                       # no data-plane outage


def test_a_killed_child_router_fails_requests_explicitly_and_the_front_door_recovers(
        tmp_path, models_dir, pages):
    cluster = start_cluster(tmp_path, models_dir)
    try:
        report = run_with_faults(cluster, pages, [(6.0, lambda: cluster.kill("router-rec")),
                                                  (10.0, lambda: cluster.restart("router-rec"))],
                                 duration_s=24.0)
    finally:
        cluster.stop()
    every_request_answered_once(report)
    killed_t, restarted_t = report.fault_times
    failed = [r for r in report.results if not r.ok]
    f = figures("SIGKILL child router rec, restart", report, killed_t, outage_s=round(restarted_t - killed_t, 1))
    assert failed, "a dead child stage must fail requests explicitly"
    assert {r.code for r in failed} <= {"UNAVAILABLE", rep.DROPPED}, f
    assert all("127.0.0.1" not in r.message for r in failed)     # no internal addresses leak
    assert all(killed_t - SLO_S - 0.5 <= r.t_s <= restarted_t + 5.0 for r in failed), f
    late_window = [r for r in report.results if r.t_s >= restarted_t + 5.0]
    assert late_window and all(r.ok for r in late_window), f
