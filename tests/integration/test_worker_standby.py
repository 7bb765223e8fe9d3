"""A parked pool worker process with a standby model (``Plan.standby``): real Redis, a
real worker process (its plan subscriber, gRPC server and ONNX Runtime), the real
detector. Plans are published straight to Redis (no controller: the worker's heartbeats
go unanswered, which it survives). Parked with a standby, it loads that model once and
stays parked; the plan that gives it that variant makes it serve with no further load."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from services.common.plan import ANY_PATH, Plan, WorkerAssignment
from services.common.plan_channel import PlanPublisher, connect
from services.common.redis_server import RedisServer, free_port
from services.common.spec import load_spec
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"
STANDBY = "det_v6small_480"


def plan(workers: dict[str, tuple[str, str]], standby: dict[str, str]) -> Plan:
    """A valid plan: ``workers`` is worker id -> (task, variant); the ``ghost-*`` workers
    exist only in the plan (the worker under test reads only its own entry)."""
    assignments = {w: WorkerAssignment(w, "127.0.0.1:1", t, v, 1) for w, (t, v) in workers.items()}
    routing = {t: {ANY_PATH: {w: 1.0 for w, a in assignments.items() if a.task == t}}
               for t in {a.task for a in assignments.values()}}
    return Plan(0, "ocr", assignments, routing, standby=standby)


async def until(get, cond, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = await get()
        except grpc.aio.AioRpcError:
            got = None       # not up yet
        if got is not None and cond(got):
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_a_parked_worker_process_loads_its_standby_and_rejoins_on_it_without_a_load(models_dir, eval_pages,
                                                                                  tmp_path):
    _, pages = eval_pages
    assert load_spec(SPEC).task("det").variant(STANDBY)
    with RedisServer() as redis:
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis.url, "PYTHONUNBUFFERED": "1"}
        with open(tmp_path / "worker.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.worker.main", "--spec", str(SPEC), "--worker-id", "pool-9",
                 "--port", str(port), "--controller", f"127.0.0.1:{free_port()}", "--models", str(models_dir),
                 "--device", "cpu", "--linger-s", "0.5"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        async def scenario():
            publisher = PlanPublisher(connect(redis.url), "ocr")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.WorkerStub(ch)

                async def stats():
                    return await stub.GetStats(pb.WorkerStatsRequest(), timeout=5)

                await until(stats, lambda s: s.state == "idle", "the worker to start")
                await publisher.publish(plan({"ghost-det": ("det", "det_v6tiny_320"), "ghost-rec": ("rec", "rec_v6tiny")},
                                             {"pool-9": f"det/{STANDBY}"}))
                parked = await until(stats, lambda s: s.state == "parked" and s.loads == 1,
                                     "the parked worker to load its standby")
                try:
                    await stub.InferBatch(pb.InferBatchRequest(task="det", deadline_unix_s=time.time() + 10,
                                                               queries=[pb.Query(query_id="q", payload=b"x")]),
                                          timeout=10)
                    refused = None
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code()
                await publisher.publish(plan({"pool-9": ("det", STANDBY), "ghost-rec": ("rec", "rec_v6tiny")}, {}))
                back = await until(stats, lambda s: s.state == "serving", "the worker to serve its standby")
                answer = await stub.InferBatch(pb.InferBatchRequest(
                    task="det", deadline_unix_s=time.time() + 30, plan_version=back.plan_version,
                    queries=[pb.Query(query_id="p0", payload=pages[0].png)]), timeout=30)
                return parked, refused, back, answer

        try:
            parked, refused, back, answer = asyncio.run(scenario())
        finally:
            proc.terminate()
            proc.wait(15)
    assert parked.variant == "" and parked.task == ""           # parked: it serves nothing
    assert refused is grpc.StatusCode.UNAVAILABLE
    assert back.variant == STANDBY and back.loads == 1            # rejoined with no model load
    r = answer.results[0]
    assert r.status == pb.OK and r.variant == STANDBY and len(r.regions) > 0
