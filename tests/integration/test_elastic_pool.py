"""The elastic worker pool on real processes: three pool workers (no ``--task``) on the
OCR pipeline with the planner. At low demand the plan needs one detection and one
recognition worker and the third parks (its model freed: its RSS falls by at least the
model's size); when demand rises the plan takes it back (it loads a model again) and
when demand falls again a worker parks again. No request fails because of a move
(no UNAVAILABLE, INTERNAL or shed answer)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import grpc

from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.ocr.cer import page_cer
from services.planner import load_profile
from services.planner.capacity import max_demand
from services.tools.cluster import ClusterConfig, LocalCluster

POOL = ["pool-0", "pool-1", "pool-2"]
# The cheapest detector and recogniser only: a page is ~0.1 s of work on a slow 2-core host,
# so the load below leaves the workers idle most of the time and a failure is the moves'
# fault, not a page's 12 recogniser lines queueing behind rec_v6small (~0.45 s a page there).
KEEP = {"det": ["det_v6tiny_320"], "rec": ["rec_v6tiny"]}


def plan_of(cluster) -> dict | None:
    with grpc.insecure_channel(cluster.controller_address) as ch:
        try:
            return json.loads(pb_grpc.ControllerStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5).plan_json)
        except grpc.RpcError:
            return None


def stats_of(cluster, wid: str) -> pb.WorkerStats:
    with grpc.insecure_channel(cluster.procs[f"worker-{wid}"].address) as ch:
        return pb_grpc.WorkerStub(ch).GetStats(pb.WorkerStatsRequest(), timeout=5)


def rss_mib(cluster, wid: str) -> float:
    pid = cluster.procs[f"worker-{wid}"].popen.pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def parked(cluster) -> list[str]:
    return [w for w in POOL if stats_of(cluster, w).state == "parked"]


def model_mib(cluster, plan: dict, wid: str) -> float:
    a = plan["workers"][wid]
    variant = cluster.spec.task(a["task"]).variant(a["variant"])
    return (Path(cluster.cfg.models) / variant.model).stat().st_size / 2**20


class LoadThread(threading.Thread):
    """Open-loop load in the background while the test watches plans and workers."""

    def __init__(self, config: LoadConfig, pages) -> None:
        super().__init__(daemon=True)
        self.config, self.pages, self.report = config, pages, None

    def run(self) -> None:
        self.report = asyncio.run(run_load(self.config, self.pages, cer_fn=page_cer)).to_dict()


def test_the_pool_parks_workers_when_demand_falls_and_takes_them_back_when_it_rises(
        models_dir, eval_pages, tmp_path, ocr_for_host):
    # this host's speed, not the profile's machine's (the demo's probe): the load must stay
    # well within what two workers carry here
    spec_path, host_profile = ocr_for_host(KEEP)
    profile = load_profile(host_profile)
    two = max_demand(profile, 2, slo_ms=1500, full_accuracy=True, method="exact").served_qps
    # 0.45x what two workers carry at full accuracy, planned with 3x headroom: the plan
    # needs the third worker, while the load itself stays within what two carry, so any
    # failure would be the moves' fault
    rate = max(0.5, 0.45 * two)
    _, pages = eval_pages
    load_pages = [LoadPage(f"p{i}", p.png, p.lines) for i, p in enumerate(pages)]
    cfg = ClusterConfig(spec=spec_path, profile=host_profile, models=models_dir,
                        log_dir=tmp_path / "logs", pool=3, worker_args=("--linger-s", "1"), headroom=3.0,
                        # hardware scaling only: the plans change replicas, never variants, so
                        # every model load here is a worker joining (no accuracy swaps beside it);
                        # plans on the probed profile the rate above comes from: corrected online
                        # by the workers' batch times, it can say two workers carry the load (with
                        # another core busy the probe measured ~2x slower than the workers ran)
                        # no standby models (Plan.standby): a parked worker here holds no model
                        # (tests/integration/test_worker_standby.py covers standbys)
                        controller_args=("--cooldown-s", "4", "--hardware-only", "--online-calibration", "off",
                                         "--standby", "off"))
    reports = []
    with LocalCluster(cfg) as cluster:
        # 1) no load: one det and one rec worker; the third parks, holding no model
        first = wait_for(lambda: (p := plan_of(cluster)) and len(p["workers"]) == 2 and p, 60, "a 2-worker plan")
        assert sorted(a["task"] for a in first["workers"].values()) == ["det", "rec"]
        idle = wait_for(lambda: parked(cluster), 30, "a parked worker")
        assert len(idle) == 1 and idle[0] not in first["workers"]
        s = stats_of(cluster, idle[0])
        assert s.task == "" and s.variant == "" and s.loads == 0

        # 2) demand rises: the plan takes all three, the parked one loads a model
        load = LoadThread(LoadConfig(target=cluster.front_door, rate=rate, duration_s=20.0, seed=7,
                                     slo_ms=1500, progress=False), load_pages)
        load.start()
        busy = wait_for(lambda: (p := plan_of(cluster)) and len(p["workers"]) == 3 and p, 25,
                        "a plan with all three workers")
        back = wait_for(lambda: (s := stats_of(cluster, idle[0])).state == "serving" and s, 20,
                        "the parked worker to serve again")
        assert back.loads >= 1 and back.task in ("det", "rec")
        load.join(60)
        reports.append(load.report)

        # 3) demand falls: after the cooldown a worker parks again and frees its model;
        # its RSS is compared with the last sample taken while it still held the model
        before: dict[str, float] = {}

        def parked_sampling():
            for w in POOL:
                rss = rss_mib(cluster, w)
                if stats_of(cluster, w).state == "parked":
                    return [w]
                before[w] = rss
            return []

        wid = wait_for(parked_sampling, 60, "a worker to park again")[0]
        size = model_mib(cluster, busy, wid)
        time.sleep(2.0)   # past the 1 s linger: the model is released
        after = rss_mib(cluster, wid)
        assert before[wid] - after >= size, (wid, before[wid], after, size)
        assert stats_of(cluster, wid).variant == ""

        # 4) and rises again: it comes back
        loads_before = stats_of(cluster, wid).loads
        load = LoadThread(LoadConfig(target=cluster.front_door, rate=rate, duration_s=15.0, seed=8,
                                     slo_ms=1500, progress=False), load_pages)
        load.start()
        wait_for(lambda: stats_of(cluster, wid).loads > loads_before and stats_of(cluster, wid).state == "serving",
                 25, "the worker to rejoin")
        load.join(60)
        reports.append(load.report)

    for r in reports:
        assert r is not None and r["sent"] > 0
        summary = str({k: r.get(k) for k in ("sent", "ok", "dropped", "shed", "total_errors", "failure_reasons")})
        # a move never fails a request: no UNAVAILABLE (no worker holding the model), no
        # INTERNAL, nothing shed. What remains on this 2-core machine is a request late past
        # its deadline at the demand step from 0, while the plan grows and a worker loads
        # (measured: 0-2 of ~33 in the second step, none in the first); a few at most. The
        # exact move semantics, request by request, are unit-tested in
        # tests/unit/test_worker_core.py; the cause of those late answers is open (issue 11).
        assert r["shed"] == 0 and r["total_errors"] == 0, summary
        assert r["ok"] + r["dropped"] == r["sent"], summary
        assert r["dropped"] <= 0.1 * r["sent"], summary
