"""What one pipeserve router hop costs, against raw grpc.aio, measured side by side.

    .venv/bin/python bench/bench_hops.py                    # ~80 s
    .venv/bin/python bench/bench_hops.py --rounds 10 --seconds 5   # longer, steadier

Every server is its own process; the client (this process, grpc.aio) is the same for all.
The paths, for each payload size (1 KB and 200 KB PNGs, the same bytes everywhere):

- ``direct``: client -> fake worker (``pipeserve.v1.Worker/InferBatch`` with protobuf,
  answers at once: one OK result with one region; ``bench/raw_grpc.py fakeworker``);
- ``raw_hop``: client -> a raw grpc.aio server (generic handler, bytes in, 64 bytes out, no
  protobuf): **one raw grpc.aio hop**, the issue's reference (its p50 and req/s per core);
- ``raw_fwd``: client -> a raw grpc.aio forwarder (bytes, no protobuf, gRPC's default
  channel options) -> fake worker: what inserting a minimal hop in front of the worker adds;
- ``raw_fwd_opts``: the same forwarder with pipeserve's channel options (retries on);
- ``router``: client -> ``services.router.main`` (a real router process, ``Route`` RPC) ->
  fake worker: a router hop;
- ``front_door``: client -> the same router process's OIP v2 ``ModelInfer`` -> fake worker.

The router serves a one-stage spec written to a temp dir (its plan, published to an
embedded Redis, routes everything to the fake worker), so it has no child stage.

Latency: one call at a time, ``--calls`` per path per round, paths alternating within
each of ``--rounds`` rounds. ``added`` = a path's p50 (p99) minus ``direct``'s.
Throughput: ``--concurrency`` callers in a closed loop for ``--seconds`` per path per
round (``--tput-rounds``); req/s per core = requests / CPU-seconds the measured hop's
process used (utime + stime from /proc/<pid>/stat) in that window; ``minor_faults_per_req``
the same process's minor page faults per request (a process that hands freed buffers back
to the kernel takes them again, zeroed: see services/common/memory.py).

Targets (issue 12): the router adds <= 1.5x the p50 of a raw grpc.aio hop
(``router_added_p50 / raw_hop_p50``), and carries >= 30 % of a raw aio server's req/s per
core (``router_per_core / raw_hop_per_core``). The same ratios against the raw forwarder
are printed too (a stricter like-for-like: it also makes an outbound call).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from services.common.logging import configure_logging  # noqa: E402

from benchlib import (Child, closed_loop, machine, pct, png_payload, r, raw_server,  # noqa: E402
                      sequential)
from raw_grpc import CLIENT_OPTIONS, RAW_METHOD  # noqa: E402
from services.common import oip  # noqa: E402
from services.common.plan import Plan, WorkerAssignment  # noqa: E402
from services.common.plan_channel import PlanPublisher, connect  # noqa: E402
from services.common.redis_server import RedisServer, free_port  # noqa: E402
from services.gen import inference_pb2 as ipb  # noqa: E402
from services.gen import inference_pb2_grpc as ipb_grpc  # noqa: E402
from services.gen import pipeserve_pb2 as pb  # noqa: E402
from services.gen import pipeserve_pb2_grpc as pb_grpc  # noqa: E402

SPEC = """
name: hop
description: one no-op stage (bench/bench_hops.py)
slo_ms: 5000
output: regions
plugins: [services.echo.processors]
tasks:
  - name: a
    variants:
      - {name: echo_a, model: echo/identity.onnx, processor: echo, input_names: [x], output_names: [y]}
"""
PATHS = ["direct", "raw_hop", "raw_fwd", "raw_fwd_opts", "router", "front_door"]
UVLOOP_PATHS = ["router_uvloop", "front_door_uvloop"]   # with --uvloop: a second router on uvloop
SIZES = {"1KB": 1024, "200KB": 200 * 1024}


def start_router(spec: Path, redis_url: str, log: Path, loop: str = "asyncio", name: str = "router") -> Child:
    port = free_port()
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1", PIPESERVE_EVENT_LOOP=loop)
    with open(log, "ab") as f:
        p = subprocess.Popen([sys.executable, "-m", "services.router.main", "--spec", str(spec), "--task", "a",
                              "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
    return Child(name, p, port, log)


async def publish_plan(redis_url: str, worker_address: str) -> None:
    client = connect(redis_url)
    try:
        plan = Plan(version=0, pipeline="hop",
                    workers={"a-0": WorkerAssignment("a-0", worker_address, "a", "echo_a", 8)},
                    routing={"a": {"*": {"a-0": 1.0}}})
        await PlanPublisher(client, "hop").publish(plan)
    finally:
        await client.aclose()


async def wait_front_door(address: str, router: Child, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if router.popen.poll() is not None:
                raise RuntimeError(f"router exited; log: {router.log_path.read_text()[-2000:]}")
            try:
                if (await stub.ModelReady(ipb.ModelReadyRequest(name="hop"), timeout=1)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("router not ready")


def make_calls(channels: dict[str, grpc.aio.Channel], payload: bytes) -> dict:
    deadline = time.time() + 3600
    infer = pb.InferBatchRequest(request_id="bench", task="a", deadline_unix_s=deadline,
                                 queries=[pb.Query(query_id="bench", payload=payload)])
    raw = infer.SerializeToString()
    route = pb.RouteRequest(request_id="bench", deadline_unix_s=deadline,
                            queries=[pb.Query(query_id="bench", payload=payload)])
    model_infer = oip.build_image_request("hop", payload, request_id="bench")
    worker = pb_grpc.WorkerStub(channels["direct"]).InferBatch
    hop = channels["raw_hop"].unary_unary(RAW_METHOD)
    fwd = channels["raw_fwd"].unary_unary(RAW_METHOD)
    fwd_opts = channels["raw_fwd_opts"].unary_unary(RAW_METHOD)

    def router_call(channel):
        stub = pb_grpc.RouterStub(channel).Route

        async def check_router():
            resp = await stub(route, timeout=30)
            assert resp.results[0].status == pb.OK, resp
            return resp
        return check_router

    def front_call(channel):
        stub = ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        return lambda: stub(model_infer, timeout=30)

    calls = {
        "direct": lambda: worker(infer, timeout=30),
        "raw_hop": lambda: hop(raw, timeout=30),
        "raw_fwd": lambda: fwd(raw, timeout=30),
        "raw_fwd_opts": lambda: fwd_opts(raw, timeout=30),
        "router": router_call(channels["router"]),
        "front_door": front_call(channels["front_door"]),
    }
    if "router_uvloop" in channels:
        calls["router_uvloop"] = router_call(channels["router_uvloop"])
        calls["front_door_uvloop"] = front_call(channels["front_door_uvloop"])
    return calls


async def measure(args, addresses: dict[str, str], pids: dict[str, int]) -> dict:
    paths = PATHS + (UVLOOP_PATHS if "router_uvloop" in addresses else [])
    channels = {k: grpc.aio.insecure_channel(a, options=CLIENT_OPTIONS) for k, a in addresses.items()}
    out: dict = {}
    try:
        for label, size in SIZES.items():
            payload = png_payload(size)
            calls = make_calls(channels, payload)
            for k in paths:                                   # warm every path (channels, caches)
                await sequential(calls[k], 50)
            lat: dict[str, list[float]] = {k: [] for k in paths}
            for rnd in range(args.rounds):
                order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
                for k in order:
                    lat[k] += await sequential(calls[k], args.calls)
            tput: dict[str, list] = {k: [] for k in paths}
            measured_pid = {"direct": "fakeworker", "raw_hop": "raw_hop", "raw_fwd": "raw_fwd",
                            "raw_fwd_opts": "raw_fwd_opts", "router": "router", "front_door": "router",
                            "router_uvloop": "router_uvloop", "front_door_uvloop": "router_uvloop"}
            for rnd in range(args.tput_rounds):
                order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
                for k in order:
                    tput[k].append(await closed_loop(calls[k], args.concurrency, args.seconds, pids))
            p50 = {k: pct(v, 0.5) for k, v in lat.items()}
            p99 = {k: pct(v, 0.99) for k, v in lat.items()}
            res = {"latency_ms": {k: {"p50": r(p50[k]), "p99": r(p99[k]), "n": len(lat[k])} for k in paths},
                   "added_ms": {k: {"p50": r(p50[k] - p50["direct"]), "p99": r(p99[k] - p99["direct"])}
                                for k in paths if k not in ("direct", "raw_hop")},
                   "throughput": {}}
            per_core = {}
            for k in paths:
                runs = tput[k]
                req = sum(t.requests for t in runs)
                secs = sum(t.seconds for t in runs)
                who = measured_pid[k]
                cpu = sum(t.cpu_s[who] for t in runs)
                per_core[k] = req / cpu if cpu > 0 else float("nan")
                res["throughput"][k] = {
                    "req_per_s": r(req / secs, 1), "measured_process": who,
                    "cpu_s_per_s": r(cpu / secs, 2), "req_per_s_per_core": r(per_core[k], 1),
                    "cpu_us_per_req": r(cpu / req * 1e6, 1) if req else None,
                    "minor_faults_per_req": r(sum(t.minor_faults.get(who, 0) for t in runs) / req, 1)
                    if req else None,
                    "errors": sum(t.errors for t in runs)}
            router_added = p50["router"] - p50["direct"]
            front_added = p50["front_door"] - p50["direct"]
            fwd_added = p50["raw_fwd"] - p50["direct"]
            res["ratios"] = {
                "router_added_p50_over_raw_hop_p50": r(router_added / p50["raw_hop"]),
                "front_door_added_p50_over_raw_hop_p50": r(front_added / p50["raw_hop"]),
                "router_added_p50_over_raw_fwd_added_p50": r(router_added / fwd_added) if fwd_added > 0 else None,
                "front_door_added_p50_over_raw_fwd_added_p50": r(front_added / fwd_added) if fwd_added > 0 else None,
                "router_added_p99_over_raw_hop_p99": r((p99["router"] - p99["direct"]) / p99["raw_hop"]),
                "router_per_core_over_raw_hop_per_core": r(per_core["router"] / per_core["raw_hop"]),
                "front_door_per_core_over_raw_hop_per_core": r(per_core["front_door"] / per_core["raw_hop"]),
                "router_per_core_over_raw_fwd_per_core": r(per_core["router"] / per_core["raw_fwd"]),
                "front_door_per_core_over_raw_fwd_per_core": r(per_core["front_door"] / per_core["raw_fwd"]),
            }
            if "router_uvloop" in paths:
                for kind in ("router", "front_door"):
                    res["ratios"][f"{kind}_uvloop_added_p50_over_asyncio"] = r(
                        (p50[f"{kind}_uvloop"] - p50["direct"]) / (p50[kind] - p50["direct"]))
                    res["ratios"][f"{kind}_uvloop_added_p50_over_raw_hop_p50"] = r(
                        (p50[f"{kind}_uvloop"] - p50["direct"]) / p50["raw_hop"])
                    res["ratios"][f"{kind}_uvloop_per_core_over_asyncio"] = r(
                        per_core[f"{kind}_uvloop"] / per_core[kind])
            res["targets"] = {
                "router_adds_le_1.5x_raw_hop_p50": res["ratios"]["router_added_p50_over_raw_hop_p50"] <= 1.5,
                "front_door_adds_le_1.5x_raw_hop_p50": res["ratios"]["front_door_added_p50_over_raw_hop_p50"] <= 1.5,
                "router_per_core_ge_30pct_raw_hop": res["ratios"]["router_per_core_over_raw_hop_per_core"] >= 0.30,
                "front_door_per_core_ge_30pct_raw_hop":
                    res["ratios"]["front_door_per_core_over_raw_hop_per_core"] >= 0.30,
            }
            out[label] = res
    finally:
        for ch in channels.values():
            await ch.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (default 5)")
    ap.add_argument("--calls", type=int, default=150, help="sequential calls per path per round")
    ap.add_argument("--tput-rounds", type=int, default=2, help="throughput rounds (default 2)")
    ap.add_argument("--seconds", type=float, default=2.5, help="closed-loop seconds per path per round")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop callers (default 16)")
    ap.add_argument("--uvloop", action="store_true",
                    help="also measure a second router process on uvloop (PIPESERVE_EVENT_LOOP=uvloop; "
                         "needs the uvloop extra)")
    a = ap.parse_args(argv)
    configure_logging("bench", level="warning")   # stdout is for the JSON only
    info = machine()
    children: list[Child] = []
    redis = RedisServer().start()
    with tempfile.TemporaryDirectory(prefix="bench-hops-") as tmp:
        try:
            spec = Path(tmp) / "hop.yaml"
            spec.write_text(SPEC)
            fake = raw_server("fakeworker", "fakeworker"); children.append(fake)
            hop = raw_server("raw_hop", "sink"); children.append(hop)
            fwd = raw_server("raw_fwd", "forward", "--to", fake.address,
                             "--method", "/pipeserve.v1.Worker/InferBatch"); children.append(fwd)
            fwd2 = raw_server("raw_fwd_opts", "forward", "--to", fake.address, "--project-options",
                              "--method", "/pipeserve.v1.Worker/InferBatch"); children.append(fwd2)
            asyncio.run(publish_plan(redis.url, fake.address))
            router = start_router(spec, redis.url, Path(tmp) / "router.log"); children.append(router)
            asyncio.run(wait_front_door(router.address, router))
            addresses = {"direct": fake.address, "raw_hop": hop.address, "raw_fwd": fwd.address,
                         "raw_fwd_opts": fwd2.address, "router": router.address, "front_door": router.address}
            if a.uvloop:
                uv = start_router(spec, redis.url, Path(tmp) / "router_uvloop.log", loop="uvloop",
                                  name="router_uvloop"); children.append(uv)
                asyncio.run(wait_front_door(uv.address, uv))
                addresses.update(router_uvloop=uv.address, front_door_uvloop=uv.address)
            pids = {c.name: c.pid for c in children}
            t0 = time.perf_counter()
            results = asyncio.run(measure(a, addresses, pids))
            took = time.perf_counter() - t0
        finally:
            for c in reversed(children):
                c.stop()
            redis.stop()
    print(json.dumps({
        "benchmark": "router hop", "machine": info, "seconds": round(took, 1),
        "settings": {"uvloop": a.uvloop, "rounds": a.rounds, "calls": a.calls, "tput_rounds": a.tput_rounds,
                     "seconds": a.seconds, "concurrency": a.concurrency},
        "paths": {"direct": "client -> fake worker (InferBatch, protobuf)",
                  "raw_hop": "client -> raw grpc.aio server (bytes, 64-byte answer)",
                  "raw_fwd": "client -> raw grpc.aio forwarder (bytes) -> fake worker",
                  "raw_fwd_opts": "raw_fwd with pipeserve's channel options (retries on)",
                  "router": "client -> pipeserve router (Route) -> fake worker",
                  "front_door": "client -> pipeserve router (OIP ModelInfer) -> fake worker",
                  "router_uvloop": "router, the same code on uvloop (--uvloop)",
                  "front_door_uvloop": "front_door, the same code on uvloop (--uvloop)"},
        "results": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
