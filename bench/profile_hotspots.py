"""Where the time goes: py-spy profiles of pipeserve's processes under load, and
microbenchmarks of the per-request steps the profiles point at.

    .venv/bin/python bench/profile_hotspots.py --py-spy runs/ray-venv/bin/py-spy          # all, ~2 min
    .venv/bin/python bench/profile_hotspots.py --py-spy PATH router front_door micro

py-spy is not a project dependency: give the path of a py-spy binary (``pip install
py-spy`` into a throwaway venv; ``ray[serve]`` brings one into ``runs/ray-venv``).
Scenarios (each prints the hottest Python frames, inclusive, idle waits left out, and
saves the collapsed stacks under ``runs/profiles/``):

- ``router``, ``front_door``: a router (one-stage spec, as in bench_hops.py) in front of
  the fake worker, 16 callers of ``Route`` / ``ModelInfer`` with ``--payload-kb`` (1); the
  router profiled;
- ``echo_chain``: bench_noop_chain.py's inline layout (pipelines/echo.yaml, one router
  process routing both stages), 16 callers of ``ModelInfer`` with ``--payload-kb``; the
  front door profiled, every process's CPU per request;
- ``echo_worker``: pipelines/echo.yaml on a LocalCluster, 16 callers of stage a's worker
  ``InferBatch`` with one 1 KB query each; the worker profiled;
- ``rec_worker``: pipelines/ocr.yaml with rec_v6tiny at batch size 1, 3 callers of its
  worker with one real crop each; the worker profiled;
- ``loadgen``: ``run_load`` at ``--rate`` against ``bench/raw_grpc.py oip``; this process
  profiled;
- ``micro``: per-call cost (µs) of steps of the front door, router and worker paths,
  timed in this process (no py-spy needed);
- ``handlers``: server CPU per call of a raw grpc.aio server with a unary handler against
  the same server with a stream-unary handler reading its one message (the front door's
  way to shed before reading a body), 1 KB, 16 callers, alternating (no py-spy needed);
- ``loadgen_gc``: ``run_load`` at ``--rate`` with the garbage collector on, then off:
  the max send lag and the longest collector pauses (no py-spy needed).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from services.common.logging import configure_logging  # noqa: E402
from benchlib import closed_loop, png_payload, raw_server  # noqa: E402
from raw_grpc import CLIENT_OPTIONS  # noqa: E402

OUT = ROOT / "runs" / "profiles"
IDLE_LEAVES = ("select (selectors.py", "Thread.run (threading.py", "_worker (concurrent/futures/thread.py",
               "wait (threading.py", "epoll_wait", "sleep (asyncio/tasks.py")


def summarize(path: Path, top: int = 25) -> dict:
    incl: collections.Counter = collections.Counter()
    selfc: collections.Counter = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        frames = [re.sub(r"\((/[^()]*/site-packages/|/root/\.pyenv/[^()]*/python3\.\d+/|" + re.escape(str(ROOT)) + "/)",
                         "(", f) for f in frames]
        if any(frames[-1].startswith(x) for x in IDLE_LEAVES):
            idle += int(n)
            continue
        total += int(n)
        for f in set(frames):
            incl[f] += int(n)
        selfc[frames[-1]] += int(n)
    skip = ("<module>", "main (", "_run_module", "_run_code", "run (asyncio", "Runner.run", "run_until_complete",
            "run_forever", "_run_once", "Thread._bootstrap")
    return {"busy_samples": total, "idle_samples_left_out": idle,
            "inclusive_pct": {k: round(100 * v / total, 1) for k, v in incl.most_common(top + 12)
                              if not any(k.startswith(s) for s in skip)},
            "self_pct": {k: round(100 * v / total, 1) for k, v in selfc.most_common(15)}}


def record(py_spy: str, pid: int, name: str, seconds: float) -> subprocess.Popen:
    OUT.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
                             "-o", str(OUT / f"{name}.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def drive(call, concurrency: int, seconds: float, pid: int) -> dict:
    t = await closed_loop(call, concurrency, seconds, {"p": pid})
    return {"req_per_s": round(t.rps, 1), "cpu_us_per_req": round(t.cpu_s["p"] / max(1, t.requests) * 1e6, 1),
            "errors": t.errors}


def profiled(py_spy, pid, name, seconds, call, concurrency) -> dict:
    spy = record(py_spy, pid, name, seconds)
    time.sleep(0.5)
    load = asyncio.run(drive(call, concurrency, seconds, pid))
    spy.wait()
    return {"load": load, "profile": summarize(OUT / f"{name}.txt")}


def scenario_router(py_spy: str, seconds: float, payload_bytes: int = 1024) -> dict:
    import bench_hops as bh
    from services.common.redis_server import RedisServer

    out = {}
    redis = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="prof-router-"))
    spec = tmp / "hop.yaml"
    spec.write_text(bh.SPEC)
    kids = []
    try:
        fake = raw_server("fakeworker", "fakeworker")
        kids.append(fake)
        asyncio.run(bh.publish_plan(redis.url, fake.address))
        router = bh.start_router(spec, redis.url, tmp / "router.log")
        kids.append(router)
        asyncio.run(bh.wait_front_door(router.address, router))
        for path in ("router", "front_door"):
            holder = {}

            async def call(path=path):
                if "calls" not in holder:
                    chans = {k: grpc.aio.insecure_channel(router.address if k in ("router", "front_door")
                                                          else fake.address, options=CLIENT_OPTIONS)
                             for k in ("direct", "router", "front_door")}
                    chans.update(raw_hop=chans["direct"], raw_fwd=chans["direct"], raw_fwd_opts=chans["direct"])
                    holder["calls"] = bh.make_calls(chans, png_payload(payload_bytes))
                return await holder["calls"][path]()
            out[path] = profiled(py_spy, router.pid, f"{path}_{payload_bytes // 1024}kb", seconds, call, 16)
    finally:
        for k in reversed(kids):
            k.stop()
        redis.stop()
    return out


def scenario_worker(py_spy: str, seconds: float, which: str) -> dict:
    from services.gen import pipeserve_pb2 as pb
    from services.gen import pipeserve_pb2_grpc as pb_grpc
    from services.tools.cluster import ClusterConfig, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix=f"prof-{which}-"))
    plan = tmp / "plan.yaml"
    if which == "echo_worker":
        from services.echo.model import write_identity_model
        write_identity_model(tmp / "models" / "echo" / "identity.onnx")
        models, spec, task, concurrency = tmp / "models", ROOT / "pipelines" / "echo.yaml", "a", 16
        plan.write_text("pipeline: echo\nallocations:\n  - {task: a, variant: echo_a, batch_size: 8}\n"
                        "  - {task: b, variant: echo_b, batch_size: 8}\n")
        payloads = [png_payload(1024)]
    else:
        from bench_worker import real_crops
        from services.common.spec import load_spec
        from services.ocr.pages import load_pages
        models, spec, task, concurrency = ROOT / "models", ROOT / "pipelines" / "ocr.yaml", "rec", 3
        plan.write_text("pipeline: ocr\nallocations:\n  - {task: det, variant: det_v6tiny_320, batch_size: 1}\n"
                        "  - {task: rec, variant: rec_v6tiny, batch_size: 1}\n")
        pages = [p.png for p in load_pages(ROOT / "data" / "eval")[:4]]
        payloads = real_crops(load_spec(spec), models, "det_v6small_480", pages)
    cluster = LocalCluster(ClusterConfig(spec=spec, plan_file=plan, models=models, log_dir=tmp / "logs"))
    cluster.start(ready_timeout_s=120)
    try:
        proc = cluster.procs[f"worker-{task}-0"]
        state = {"i": 0}

        async def call():
            if "stub" not in state:
                state["stub"] = pb_grpc.WorkerStub(grpc.aio.insecure_channel(proc.address, options=CLIENT_OPTIONS))
            state["i"] += 1
            req = pb.InferBatchRequest(request_id="p", task=task, deadline_unix_s=time.time() + 60, queries=[
                pb.Query(query_id=f"p{state['i']}", payload=payloads[state["i"] % len(payloads)])])
            await state["stub"].InferBatch(req, timeout=30)
        return profiled(py_spy, proc.popen.pid, which, seconds, call, concurrency)
    finally:
        cluster.stop()


def scenario_echo_chain(py_spy: str, seconds: float, payload_bytes: int = 1024) -> dict:
    """The front door of ``bench_noop_chain.py``'s inline layout (two no-op stages, one
    router process routing both) under 16 closed-loop callers; every process's CPU per
    request beside the front door's profile."""
    import bench_noop_chain as nc
    from services.echo.model import write_identity_model

    tmp = Path(tempfile.mkdtemp(prefix="prof-echo-chain-"))
    write_identity_model(tmp / "models" / "echo" / "identity.onnx")
    system = nc.Pipeserve(tmp, tmp / "models", inline=True)
    system.start()
    try:
        pids = system.pids()
        front = system.cluster.procs["router-a"].popen.pid
        holder: dict = {}

        async def call():
            if "call" not in holder:
                holder["call"] = system.call_factory(grpc.aio.insecure_channel(
                    system.address, options=CLIENT_OPTIONS))(png_payload(payload_bytes))
            return await holder["call"]()
        spy = record(py_spy, front, f"echo_chain_{payload_bytes // 1024}kb", seconds)
        time.sleep(0.5)
        t = asyncio.run(closed_loop(call, 16, seconds, pids))
        spy.wait()
    finally:
        system.cluster.stop()
    per_proc = {k: round(v / max(1, t.requests) * 1e6, 1) for k, v in t.cpu_s.items()}
    return {"load": {"req_per_s": round(t.rps, 1), "cpu_us_per_req_by_process": per_proc, "errors": t.errors},
            "profile": summarize(OUT / f"echo_chain_{payload_bytes // 1024}kb.txt")}


def scenario_loadgen(py_spy: str, seconds: float, rate: float) -> dict:
    import os

    from services.loadgen.runner import LoadConfig, LoadPage, run_load
    from services.loadgen.schedule import poisson_schedule

    server = raw_server("oip", "oip")
    try:
        spy = record(py_spy, os.getpid(), "loadgen", seconds)
        time.sleep(0.5)
        cfg = LoadConfig(target=server.address, pipeline="echo", rate=rate, duration_s=seconds, slo_ms=5000,
                         progress=False)
        c0 = time.process_time()
        rep = asyncio.run(run_load(cfg, [LoadPage("p", png_payload(1024))],
                                   schedule=poisson_schedule(rate, seconds, 0), cer_fn=lambda *_: 0.0))
        cpu = time.process_time() - c0
        spy.wait()
    finally:
        server.stop()
    return {"load": {"rate": rate, "sent": rep.sent, "max_send_lag_ms": round(rep.max_send_lag_ms, 2),
                     "cpu_us_per_req": round(cpu / max(1, rep.sent) * 1e6, 1)},
            "profile": summarize(OUT / "loadgen.txt")}


def handlers(seconds: float) -> dict:
    from benchlib import r
    from raw_grpc import RAW_METHOD

    servers = {"unary": raw_server("unary", "sink"), "stream_unary": raw_server("stream_unary", "sink_stream")}
    payload = png_payload(1024)
    out: dict = {k: {"req": 0, "cpu": 0.0, "secs": 0.0} for k in servers}
    try:
        async def run(name):
            async with grpc.aio.insecure_channel(servers[name].address, options=CLIENT_OPTIONS) as ch:
                fn = ch.unary_unary(RAW_METHOD)
                t = await closed_loop(lambda: fn(payload, timeout=10), 16, seconds, {"s": servers[name].pid})
            out[name]["req"] += t.requests
            out[name]["cpu"] += t.cpu_s["s"]
            out[name]["secs"] += t.seconds
        for rnd in range(4):
            for name in (["unary", "stream_unary"] if rnd % 2 == 0 else ["stream_unary", "unary"]):
                asyncio.run(run(name))
    finally:
        for s in servers.values():
            s.stop()
    res = {k: {"req_per_s": r(v["req"] / v["secs"], 1), "server_cpu_us_per_req": r(v["cpu"] / v["req"] * 1e6, 1)}
           for k, v in out.items()}
    res["stream_over_unary_cpu"] = r(res["stream_unary"]["server_cpu_us_per_req"] / res["unary"]["server_cpu_us_per_req"])
    return res


def loadgen_gc(seconds: float, rate: float) -> dict:
    import gc

    from services.loadgen.runner import LoadConfig, LoadPage, run_load
    from services.loadgen.schedule import poisson_schedule

    server = raw_server("oip", "oip")
    out = {}
    pauses: list = []
    started: dict = {}

    def cb(phase, info):
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
        elif info["generation"] in started:
            pauses.append(((time.perf_counter() - started.pop(info["generation"])) * 1e3, info["generation"]))
    gc.callbacks.append(cb)
    try:
        for rnd in range(2):
            for mode in ("gc_on", "gc_off"):
                pauses.clear()
                if mode == "gc_off":
                    gc.disable()
                cfg = LoadConfig(target=server.address, pipeline="echo", rate=rate, duration_s=seconds,
                                 slo_ms=5000, progress=False)
                rep = asyncio.run(run_load(cfg, [LoadPage("p", png_payload(1024))],
                                           schedule=poisson_schedule(rate, seconds, rnd), cer_fn=lambda *_: 0.0))
                gc.enable()
                gen2 = sorted((ms for ms, g in pauses if g == 2), reverse=True)
                out.setdefault(mode, []).append({
                    "max_send_lag_ms": round(rep.max_send_lag_ms, 2), "sent": rep.sent,
                    "gen2_collections": len(gen2), "longest_gen2_ms": round(gen2[0], 2) if gen2 else 0.0})
    finally:
        gc.callbacks.remove(cb)
        server.stop()
    return {"rate": rate, "seconds": seconds, **out}


def micro() -> dict:
    """Per-call µs of single steps, best of 5 repeats."""
    import structlog

    from services.common import oip
    from services.gen import inference_pb2 as ipb
    from services.gen import pipeserve_pb2 as pb

    png = png_payload(1024)
    big = png_payload(200 * 1024)
    req_bytes = oip.build_image_request("hop", png, request_id="x").SerializeToString()
    req = ipb.ModelInferRequest.FromString(req_bytes)
    result = pb.QueryResult(query_id="x", status=pb.OK, variant="echo_a", regions=[pb.Region(text="1024:abc")])

    def best(fn, n=2000):
        out = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t) / n * 1e6)
        return round(min(out), 2)

    res = {
        "parse ModelInferRequest (1 KB)": best(lambda: ipb.ModelInferRequest.FromString(req_bytes)),
        "oip.extract_image (1 KB PNG)": best(lambda: oip.extract_image(req, max_bytes=8 << 20, max_side=4096,
                                                                        max_pixels=1 << 24)),
        "oip.build_ocr_response (1 line)": best(lambda: oip.build_ocr_response(
            "hop", "x", [oip.OcrLine("t", (0.0,) * 8, 1.0)], {"plan_version": 1, "variant_path": "a/b"})),
        "structlog bind + unbind request_id": best(lambda: (structlog.contextvars.bind_contextvars(request_id="x"),
                                                             structlog.contextvars.unbind_contextvars("request_id"))),
        "InferBatchRequest build + serialize (1 KB)": best(lambda: pb.InferBatchRequest(
            request_id="x", task="a", deadline_unix_s=1.0, queries=[pb.Query(query_id="x", payload=png)]
        ).SerializeToString()),
        "InferBatchRequest build + serialize (200 KB)": best(lambda: pb.InferBatchRequest(
            request_id="x", task="a", deadline_unix_s=1.0, queries=[pb.Query(query_id="x", payload=big)]
        ).SerializeToString(), n=500),
        "QueryResult (1 region) serialize": best(lambda: result.SerializeToString()),
    }
    pool = ThreadPoolExecutor(max_workers=2)

    async def loop_costs():
        loop = asyncio.get_running_loop()

        def nothing():
            return None

        async def coro():
            return None

        async def timed(make, n=3000):
            out = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(n):
                    await make()
                out.append((time.perf_counter() - t) / n * 1e6)
            return round(min(out), 2)
        return {
            "await run_in_executor (thread pool round trip, no work)": await timed(
                lambda: loop.run_in_executor(pool, nothing)),
            "await asyncio.gather(one coroutine)": await timed(lambda: asyncio.gather(coro())),
            "await coroutine directly": await timed(coro),
            "await asyncio.create_task(coroutine)": await timed(lambda: asyncio.create_task(coro())),
        }
    res.update(asyncio.run(loop_costs()))
    pool.shutdown()
    return {"us_per_call": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", default=["micro", "handlers", "router", "front_door", "echo_worker",
                                                     "rec_worker", "echo_chain", "loadgen", "loadgen_gc"])
    ap.add_argument("--py-spy", default=str(ROOT / "runs" / "ray-venv" / "bin" / "py-spy"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=2000.0, help="loadgen scenario's request rate")
    ap.add_argument("--payload-kb", type=int, default=1,
                    help="size of the PNG the router and front_door scenarios send (KiB; the hop benchmark uses 1 and 200)")
    a = ap.parse_args(argv)
    configure_logging("bench", level="warning")
    needs_spy = [s for s in a.scenarios if s not in ("micro", "handlers", "loadgen_gc")]
    if needs_spy and not Path(a.py_spy).exists():
        raise SystemExit(f"no py-spy at {a.py_spy} (pip install py-spy into a throwaway venv; --py-spy PATH)")
    out: dict = {}
    if "micro" in a.scenarios:
        out["micro"] = micro()
    if "handlers" in a.scenarios:
        out["handlers"] = handlers(a.seconds / 2)
    if "loadgen_gc" in a.scenarios:
        out["loadgen_gc"] = loadgen_gc(a.seconds / 2, a.rate)
    if {"router", "front_door"} & set(a.scenarios):
        out.update({k: v for k, v in scenario_router(a.py_spy, a.seconds, a.payload_kb * 1024).items() if k in a.scenarios})
    for w in ("echo_worker", "rec_worker"):
        if w in a.scenarios:
            out[w] = scenario_worker(a.py_spy, a.seconds, w)
    if "echo_chain" in a.scenarios:
        out["echo_chain"] = scenario_echo_chain(a.py_spy, a.seconds, a.payload_kb * 1024)
    if "loadgen" in a.scenarios:
        out["loadgen"] = scenario_loadgen(a.py_spy, a.seconds, a.rate)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
