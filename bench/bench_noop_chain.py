"""Two no-op stages end to end: pipeserve against a raw two-hop grpc.aio chain and against
Ray Serve, measured side by side by the same client loop on the same payloads.

    .venv/bin/python bench/bench_noop_chain.py                 # ~80 s (Ray Serve included)
    .venv/bin/python bench/bench_noop_chain.py --no-ray        # without Ray Serve
    .venv/bin/python bench/bench_noop_chain.py --rounds 6 --seconds 5 --cold-starts 3

The three systems (each its own processes, started by this script):

- **pipeserve**: ``pipelines/echo.yaml`` on a LocalCluster (embedded Redis, controller on
  an operator plan, one worker per stage running the ONNX Identity model in ONNX Runtime,
  two routers); the client calls the front door's OIP v2 ``ModelInfer``. Stage a's
  worker echoes the bytes as the child payload, the routers carry them to stage b, whose
  worker runs them through the model again; the answer is the digest of the bytes
  (``<length>:<crc32 hex>``).
- **raw chain**: client -> hop1 (a raw grpc.aio forwarder, bytes, no protobuf) -> hop2 (a
  raw grpc.aio server answering the same digest) -> back (``bench/raw_grpc.py``).
- **Ray Serve**: two deployments, the first calling the second through a DeploymentHandle,
  behind Ray Serve's gRPC proxy (``bench/ray_chain.py``), in its own venv
  (``--ray-python``, default ``runs/ray-venv/bin/python``; make it with
  ``python3 -m venv runs/ray-venv && runs/ray-venv/bin/pip install "ray[serve]"``). Its
  deployments are plain Python (no ONNX Runtime call), which favours Ray slightly.

Every system answers a short digest rather than the bytes (pipeserve's front door answers
the stage results, not the payload), so none is charged for sending 200 KB back.
Payloads: PNGs of exactly 1 KB and 200 KB (the front door accepts images only).

Measured: **cold start** (spawn of the first process to the first successful answer;
pipeserve's through ``LocalCluster.start``, whose readiness poll runs every 0.2 s), each
system started alone before the others; **latency** (one call at a time, ``--calls`` per
system per round, systems alternating within ``--rounds`` rounds): p50, p99; **max req/s**
(``--concurrency`` callers in a closed loop, ``--seconds`` per system per round,
``--tput-rounds`` rounds) and the CPU every process of the system used per request.

Targets (issue 12): pipeserve p50 <= 2.5x the raw chain's and req/s >= 60 % of it; >= 5x
Ray Serve on both (p50 at most a fifth, req/s at least five times); cold start of the
whole local cluster < 3 s.
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
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from services.common.logging import configure_logging  # noqa: E402

from benchlib import (Child, closed_loop, cpu_seconds, kill_session, machine, pct, png_payload, r,  # noqa: E402
                      raw_server, sequential, session_cpu_seconds)
from raw_grpc import CLIENT_OPTIONS, RAW_METHOD  # noqa: E402
from services.common import oip  # noqa: E402
from services.common.redis_server import free_port  # noqa: E402
from services.gen import inference_pb2_grpc as ipb_grpc  # noqa: E402
from services.tools.cluster import ClusterConfig, LocalCluster  # noqa: E402

SPEC = ROOT / "pipelines" / "echo.yaml"
PLAN = """
pipeline: echo
allocations:
  - {task: a, variant: echo_a, batch_size: 8, replicas: 1}
  - {task: b, variant: echo_b, batch_size: 8, replicas: 1}
"""
PROTO = """
syntax = "proto3";
package benchecho;
message Blob { bytes data = 1; }
service Echo { rpc Call(Blob) returns (Blob); }
"""
SIZES = {"1KB": 1024, "200KB": 200 * 1024}


def digest(data: bytes) -> str:
    return f"{len(data)}:{zlib.crc32(data):08x}"


def gen_proto(out: Path) -> None:
    (out / "benchecho.proto").write_text(PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                    f"--grpc_python_out={out}", str(out / "benchecho.proto")], check=True)
    sys.path.insert(0, str(out))


# -- the three systems ----------------------------------------------------------------------

class Pipeserve:
    """``inline``: one router process routes both stages (``--inline-children``), so the
    chain is client -> front door -> worker a, front door -> worker b (three RPCs in series
    where the per-stage layout has four)."""

    def __init__(self, tmp: Path, models: Path, inline: bool = False) -> None:
        self.name = "pipeserve_inline" if inline else "pipeserve"
        plan = tmp / "echo-plan.yaml"
        plan.write_text(PLAN)
        self.cluster = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models,
                                                  log_dir=tmp / f"{self.name}-logs", inline_routers=inline))

    def start(self) -> None:
        self.cluster.start(ready_timeout_s=120)

    @property
    def address(self) -> str:
        return self.cluster.front_door

    def pids(self) -> dict[str, int]:
        pids = {name: p.popen.pid for name, p in self.cluster.procs.items()}
        if self.cluster.redis is not None and self.cluster.redis.proc is not None:
            pids["redis"] = self.cluster.redis.proc.pid
        return pids

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids().values())

    def call_factory(self, channel: grpc.aio.Channel):
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)

        def make(payload: bytes):
            req = oip.build_image_request("echo", payload, request_id="bench")
            want = digest(payload)

            async def call():
                resp = await stub.ModelInfer(req, timeout=30)
                got = oip.parse_ocr_response(resp)[0].text
                if got != want:
                    raise RuntimeError(f"pipeserve answered {got!r}, expected {want!r}")
            return call
        return make

    def stop(self) -> None:
        self.cluster.stop()


class RawChain:
    name = "raw_chain"

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self) -> None:
        hop2 = raw_server("hop2", "digest")
        self.children.append(hop2)
        self.children.append(raw_server("hop1", "forward", "--to", hop2.address))

    @property
    def address(self) -> str:
        return self.children[-1].address

    def cpu(self) -> float:
        return sum(cpu_seconds(c.pid) for c in self.children)

    def call_factory(self, channel: grpc.aio.Channel):
        fn = channel.unary_unary(RAW_METHOD)

        def make(payload: bytes):
            want = digest(payload).encode()

            async def call():
                got = await fn(payload, timeout=30)
                if got != want:
                    raise RuntimeError(f"raw chain answered {got!r}")
            return call
        return make

    def stop(self) -> None:
        for c in reversed(self.children):
            c.stop()


class RayServe:
    name = "ray_serve"

    def __init__(self, python: str, proto_dir: Path, log: Path) -> None:
        self.python, self.proto_dir, self.log = python, proto_dir, log
        self.port = free_port()
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(
                [self.python, str(ROOT / "bench" / "ray_chain.py"), "--grpc-port", str(self.port),
                 "--http-port", str(free_port()), "--proto-dir", str(self.proto_dir)],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu(self) -> float:
        return session_cpu_seconds(self.popen.pid)

    def call_factory(self, channel: grpc.aio.Channel):
        import benchecho_pb2
        import benchecho_pb2_grpc
        stub = benchecho_pb2_grpc.EchoStub(channel)
        meta = (("application", "echo"),)

        def make(payload: bytes):
            req = benchecho_pb2.Blob(data=payload)
            want = digest(payload).encode()

            async def call():
                got = (await stub.Call(req, metadata=meta, timeout=30)).data
                if got != want:
                    raise RuntimeError(f"Ray answered {got!r}")
            return call
        return make

    def stop(self) -> None:
        if self.popen is None:
            return
        sid = self.popen.pid
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        kill_session(sid)            # raylet, GCS, actors: everything of the session it started
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


async def first_answer(system, payload: bytes, t0: float, timeout_s: float) -> float:
    """Poll ``system`` until one call succeeds; seconds since ``t0``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with grpc.aio.insecure_channel(system.address, options=CLIENT_OPTIONS) as ch:
                await system.call_factory(ch)(payload)()
            return time.perf_counter() - t0
        except (grpc.aio.AioRpcError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            if isinstance(system, RayServe) and not system.alive():
                raise RuntimeError(f"the Ray process exited (log: {system.log})") from None
            await asyncio.sleep(0.05)


def cold_start(system, payload: bytes, timeout_s: float = 180) -> float:
    t0 = time.perf_counter()
    system.start()
    return asyncio.run(first_answer(system, payload, t0, timeout_s))


async def pipeserve_breakdown(ps: "Pipeserve", payload: bytes, rounds: int, calls: int) -> dict:
    """p50 of one call at a time to each piece of the pipeserve chain, alternating: the
    workers alone, stage b's router (-> worker b), the root router's Route (-> worker a,
    then router b -> worker b; no OIP), and the front door's ModelInfer (all of it)."""
    from services.gen import pipeserve_pb2 as pb
    from services.gen import pipeserve_pb2_grpc as pb_grpc

    c = ps.cluster
    addr = {"worker_a": c.procs["worker-a-0"].address, "worker_b": c.procs["worker-b-0"].address,
            "router_b": c.router_addresses["b"], "router_a": c.router_addresses["a"], "front_door": c.front_door}
    chans = {k: grpc.aio.insecure_channel(v, options=CLIENT_OPTIONS) for k, v in addr.items()}
    deadline = time.time() + 3600
    q = [pb.Query(query_id="x", payload=payload)]
    infer_a = pb.InferBatchRequest(request_id="x", task="a", deadline_unix_s=deadline, queries=q)
    infer_b = pb.InferBatchRequest(request_id="x", task="b", deadline_unix_s=deadline, queries=q)
    route = pb.RouteRequest(request_id="x", deadline_unix_s=deadline, queries=q)
    route_b = pb.RouteRequest(request_id="x", deadline_unix_s=deadline, queries=q, upstream_path="echo_a")
    front = ps.call_factory(chans["front_door"])(payload)
    calls_ = {"worker_a": lambda: pb_grpc.WorkerStub(chans["worker_a"]).InferBatch(infer_a, timeout=30),
              "worker_b": lambda: pb_grpc.WorkerStub(chans["worker_b"]).InferBatch(infer_b, timeout=30),
              "router_b_route": lambda: pb_grpc.RouterStub(chans["router_b"]).Route(route_b, timeout=30),
              "router_a_route": lambda: pb_grpc.RouterStub(chans["router_a"]).Route(route, timeout=30),
              "front_door": front}
    lat: dict[str, list[float]] = {k: [] for k in calls_}
    try:
        for k in calls_:
            await sequential(calls_[k], 20)
        names = list(calls_)
        for rnd in range(rounds):
            for k in names[rnd % len(names):] + names[:rnd % len(names)]:
                lat[k] += await sequential(calls_[k], calls)
    finally:
        for ch in chans.values():
            await ch.close()
    p50 = {k: pct(v, 0.5) for k, v in lat.items()}
    return {"p50_ms": {k: r(v) for k, v in p50.items()},
            "derived_ms": {
                "router_b_own (router_b_route - worker_b)": r(p50["router_b_route"] - p50["worker_b"]),
                "router_a_own (router_a_route - worker_a - router_b_route)":
                    r(p50["router_a_route"] - p50["worker_a"] - p50["router_b_route"]),
                "front_door_oip (front_door - router_a_route)": r(p50["front_door"] - p50["router_a_route"])}}


async def measure(a, systems: list, pids: dict) -> dict:
    channels = {s.name: grpc.aio.insecure_channel(s.address, options=CLIENT_OPTIONS) for s in systems}
    names = [s.name for s in systems]
    out = {}
    try:
        for label in a.sizes:
            payload = png_payload(SIZES[label])
            calls = {s.name: s.call_factory(channels[s.name])(payload) for s in systems}
            for n in names:
                await sequential(calls[n], 20)          # warm-up
            lat: dict[str, list[float]] = {n: [] for n in names}
            for rnd in range(a.rounds):
                for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                    lat[n] += await sequential(calls[n], a.calls)
            tput: dict[str, list] = {n: [] for n in names}
            for rnd in range(a.tput_rounds):
                for n in names[rnd % len(names):] + names[:rnd % len(names)]:
                    tput[n].append(await closed_loop(calls[n], a.concurrency, a.seconds, pids))
            res = {"latency_ms": {}, "throughput": {}}
            p50, rps = {}, {}
            for n in names:
                p50[n] = pct(lat[n], 0.5)
                res["latency_ms"][n] = {"p50": r(p50[n]), "p99": r(pct(lat[n], 0.99)), "n": len(lat[n])}
                req = sum(t.requests for t in tput[n])
                secs = sum(t.seconds for t in tput[n])
                cpu = sum(t.cpu_s[n] for t in tput[n])
                rps[n] = req / secs
                res["throughput"][n] = {"req_per_s": r(rps[n], 1),
                                        "system_cpu_ms_per_req": r(cpu / req * 1e3, 3) if req else None,
                                        "system_cpu_s_per_s": r(cpu / secs, 2),
                                        "errors": sum(t.errors for t in tput[n]),
                                        "error_kinds": dict(sum((Counter(t.error_kinds) for t in tput[n]),
                                                                Counter()))}
                if n.startswith("pipeserve"):        # where pipeserve's CPU goes, per process
                    parts = sorted({k.split(":", 1)[1] for t in tput[n] for k in t.cpu_s
                                    if k.startswith(f"{n}:")})
                    res["throughput"][n]["cpu_ms_per_req_by_process"] = {
                        k: r(sum(t.cpu_s[f"{n}:{k}"] for t in tput[n]) / req * 1e3, 3) for k in parts}
            raw = "raw_chain"
            ratios, targets = {}, {}
            for ps in [n for n in names if n.startswith("pipeserve")]:
                sfx = "" if ps == "pipeserve" else ps.removeprefix("pipeserve")   # "", "_inline"
                ratios[f"p50_over_raw_chain{sfx}"] = r(p50[ps] / p50[raw])
                ratios[f"req_per_s_over_raw_chain{sfx}"] = r(rps[ps] / rps[raw])
                targets[f"p50_le_2.5x_raw_chain{sfx}"] = ratios[f"p50_over_raw_chain{sfx}"] <= 2.5
                targets[f"req_per_s_ge_60pct_raw_chain{sfx}"] = ratios[f"req_per_s_over_raw_chain{sfx}"] >= 0.6
                if "ray_serve" in names:
                    ratios[f"ray_p50_over_pipeserve_p50{sfx}"] = r(p50["ray_serve"] / p50[ps])
                    ratios[f"pipeserve_req_per_s_over_ray{sfx}"] = r(rps[ps] / rps["ray_serve"])
                    targets[f"p50_5x_better_than_ray{sfx}"] = ratios[f"ray_p50_over_pipeserve_p50{sfx}"] >= 5
                    targets[f"req_per_s_5x_ray{sfx}"] = ratios[f"pipeserve_req_per_s_over_ray{sfx}"] >= 5
            if "pipeserve" in names and "pipeserve_inline" in names:
                ratios["inline_p50_over_per_stage"] = r(p50["pipeserve_inline"] / p50["pipeserve"])
                ratios["inline_req_per_s_over_per_stage"] = r(rps["pipeserve_inline"] / rps["pipeserve"])
            res["ratios"], res["targets"] = ratios, targets
            ps_sys = next((s for s in systems if s.name == "pipeserve"), None)
            if ps_sys is not None:
                res["pipeserve_breakdown"] = await pipeserve_breakdown(ps_sys, payload, a.rounds, a.calls // 2)
            out[label] = res
    finally:
        for ch in channels.values():
            await ch.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=list(SIZES), help="1KB,200KB")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=100, help="sequential calls per system per round")
    ap.add_argument("--tput-rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="closed-loop seconds per system per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cold-starts", type=int, default=1, help="cold starts of each system (the last stays up)")
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=["per-stage", "inline"],
                    help="pipeserve layouts to measure: per-stage (a router process per stage) "
                         "and/or inline (one router process routes both stages); default both")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-python", default=str(ROOT / "runs" / "ray-venv" / "bin" / "python"))
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    a = ap.parse_args(argv)
    configure_logging("bench", level="warning")   # stdout is for the JSON only
    info = machine()
    if not (a.models / "echo" / "identity.onnx").is_file():
        from services.echo.model import write_identity_model
        write_identity_model(a.models / "echo" / "identity.onnx")
    probe = png_payload(1024)
    result: dict = {"benchmark": "two no-op stages end to end", "machine": info,
                    "settings": {k: v for k, v in vars(a).items() if k not in ("models",)}}
    started: list = []
    cold: dict[str, list[float]] = {}
    ray_error = None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            gen_proto(tmp)
            bad = set(a.layouts) - {"per-stage", "inline"}
            if bad or not a.layouts:
                raise SystemExit(f"--layouts takes per-stage and/or inline, got {a.layouts}")
            factories = [(name, lambda inline=inline: Pipeserve(tmp, a.models, inline=inline))
                         for layout, name, inline in (("per-stage", "pipeserve", False),
                                                      ("inline", "pipeserve_inline", True))
                         if layout in a.layouts]
            factories.append(("raw_chain", RawChain))
            if not a.no_ray:
                if Path(a.ray_python).exists():
                    factories.append(("ray_serve", lambda: RayServe(a.ray_python, tmp, tmp / "ray.log")))
                else:
                    ray_error = (f"no Ray venv at {a.ray_python}: python3 -m venv runs/ray-venv && "
                                 "runs/ray-venv/bin/pip install 'ray[serve]'")
            for name, make in factories:
                for i in range(a.cold_starts):
                    system = make()
                    try:
                        cold.setdefault(name, []).append(cold_start(system, probe))
                    except Exception as exc:
                        system.stop()
                        if name != "ray_serve":
                            raise
                        log = (tmp / "ray.log").read_text(errors="replace")[-3000:] if (tmp / "ray.log").exists() else ""
                        ray_error = f"Ray Serve did not answer: {exc!r}; log tail: {log}"
                        break
                    if i < a.cold_starts - 1:
                        system.stop()
                        time.sleep(1)
                    else:
                        started.append(system)
            pids = {s.name: s.cpu for s in started}
            idle = {s.name: s.cpu() for s in started}
            time.sleep(2)
            idle = {n: r((f() - idle[n]) / 2, 3) for n, f in pids.items()}
            for s in started:
                if isinstance(s, Pipeserve):
                    pids.update({f"{s.name}:{k}": v for k, v in s.pids().items()})
            result["idle_cpu_s_per_s"] = idle
            result["cold_start_s"] = {n: {"min": r(min(v)), "max": r(max(v)), "runs": [r(x) for x in v]}
                                      for n, v in cold.items()}
            result["results"] = asyncio.run(measure(a, started, pids))
        finally:
            for s in reversed(started):
                s.stop()
    cs = result["cold_start_s"]
    result["cold_start"] = {}
    for ps in [n for n in cs if n.startswith("pipeserve")]:
        result["cold_start"][f"{ps}_s"] = cs[ps]["min"]
        result["cold_start"][f"{ps}_target_lt_3s"] = cs[ps]["min"] < 3.0
        if "ray_serve" in cs:
            result["cold_start"][f"ray_over_{ps}"] = r(cs["ray_serve"]["min"] / cs[ps]["min"])
    if ray_error:
        result["ray_error"] = ray_error
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
