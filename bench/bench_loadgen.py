"""Load generator capacity: the request rate pipeserve's load generator sends on schedule
with small payloads, against what a raw grpc.aio server answers, in the same run.

    .venv/bin/python bench/bench_loadgen.py                   # ~2 minutes
    .venv/bin/python bench/bench_loadgen.py --seconds 10 --multiples 1,1.5,2,3,4 --procs 1,2,4

1. **Raw server capacity** (the reference): ``bench/raw_grpc.py oip``, a grpc.aio server
   answering ``ModelInfer`` with a prebuilt one-line OCR response (bytes in, bytes out,
   nothing parsed), driven by a closed loop of ``--concurrency`` callers for
   ``--ref-seconds``; measured before and after the load runs, the mean is the reference
   (the closed-loop client's own CPU per request is printed too: a bare grpc.aio client's).
2. **Load generator**: ``services.loadgen.runner.run_load`` (the code behind
   ``pipeserve-loadgen``) sends a Poisson schedule (``poisson_schedule``) of 1 KB PNG
   requests to that same server at ``--multiples`` of the reference rate, ``--seconds``
   each. For each rate: the offered rate, the rate answered, the max send lag (how late
   the generator sent its latest request: the issue's bound is 5 ms) and the generator's
   CPU per request (this process's CPU time plus its sender processes'). Each rate is run
   once per ``--procs`` value: 1 is the single event loop, N > 1 the multi-process sender
   (``LoadConfig(procs=N)``, ``pipeserve-loadgen --procs N``) with the same schedule;
   ``loadgen_cpu_ms_per_req_sending`` leaves out the CPU of starting the senders (measured
   once per N with a one-request run, ``sender_startup_cpu_s``).
3. **The machine's own jitter**: before each load run, a bare asyncio loop in this process
   sleeps 2 ms at a time for ``--seconds / 2`` and records its worst overshoot: a max send
   lag near it is the machine's scheduling noise, not the generator.

Target (issue 12): the generator sends on schedule (max send lag < 5 ms) at >= the raw
server's req/s: ``on_schedule_rate_over_raw_server`` >= 1, where the on-schedule rate is
the highest offered rate whose run kept the lag under 5 ms, over all ``--procs`` values
(``by_procs`` gives it per value). The server shares the 2 cores
with the generator: beyond its capacity requests queue and latency grows, which is the
server's limit, not the generator's (``ok`` still counts what came back in time).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from services.common.logging import configure_logging  # noqa: E402

from benchlib import closed_loop, machine, png_payload, r, raw_server  # noqa: E402
from raw_grpc import CLIENT_OPTIONS  # noqa: E402
from services.common import oip  # noqa: E402
from services.gen import inference_pb2_grpc as ipb_grpc  # noqa: E402
from services.loadgen.runner import LoadConfig, LoadPage, run_load  # noqa: E402
from services.loadgen.schedule import poisson_schedule  # noqa: E402

LAG_BOUND_MS = 5.0


async def idle_jitter_ms(seconds: float) -> float:
    """Worst overshoot of ``asyncio.sleep(0.002)`` over ``seconds``, in ms."""
    worst, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await asyncio.sleep(0.002)
        worst = max(worst, (time.perf_counter() - t - 0.002) * 1e3)
    return worst


async def reference(address: str, payload: bytes, a, pid: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        req = oip.build_image_request("echo", payload, request_id="ref")

        async def call():
            await stub.ModelInfer(req, timeout=10)
        t = await closed_loop(call, a.concurrency, a.ref_seconds, {"server": pid, "client": os.getpid()})
    return {"req_per_s": t.rps, "server_cpu_s_per_s": t.cpu_s["server"] / t.seconds, "errors": t.errors,
            "client_cpu_ms_per_req": t.cpu_s["client"] / max(1, t.requests) * 1e3}


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished (joined) children: the sender
    processes. The raw server is still running, so it is not in the children's share."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


async def loadgen(address: str, payload: bytes, rate: float, seconds: float, seed: int,
                  procs: int = 1) -> dict:
    cfg = LoadConfig(target=address, pipeline="echo", rate=rate, duration_s=seconds, seed=seed,
                     slo_ms=5000, progress=False, procs=procs)
    schedule = poisson_schedule(rate, seconds, seed)
    c0 = _cpu_s()
    rep = await run_load(cfg, [LoadPage("p", payload)], schedule=schedule, cer_fn=lambda *_: 0.0)
    cpu = _cpu_s() - c0   # with procs > 1: includes the senders' start-up (imports)
    outcomes = rep.ok + rep.dropped + rep.shed + rep.invalid + rep.total_errors
    return {"procs": procs, "rate_asked": r(rate, 1), "offered_req_per_s": r(rep.offered_rps, 1),
            "scheduled": len(schedule), "one_outcome_each": len(rep.results) == len(schedule) == outcomes,
            "send_lag_p50_ms": r(rep.send_lag_p50_ms or 0, 2), "send_lag_p99_ms": r(rep.send_lag_p99_ms or 0, 2),
            "sent": rep.sent,
            "ok": rep.ok, "answered_req_per_s": r(rep.throughput_rps, 1),
            "max_send_lag_ms": r(rep.max_send_lag_ms, 2), "on_schedule": rep.max_send_lag_ms < LAG_BOUND_MS,
            "latency_p50_ms": r(rep.latency_p50_ms or 0, 2), "latency_p99_ms": r(rep.latency_p99_ms or 0, 2),
            "loadgen_cpu_s": r(cpu, 3), "loadgen_cpu_ms_per_req": r(cpu / max(1, rep.sent) * 1e3, 3),
            "errors": rep.errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--multiples", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.25, 0.5, 1.0],
                    help="offered rates, as multiples of the raw server's req/s (default 0.1,0.25,0.5,1)")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per load run")
    ap.add_argument("--ref-seconds", type=float, default=4.0, help="seconds per reference measurement")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop callers for the reference")
    ap.add_argument("--payload-bytes", type=int, default=1024)
    ap.add_argument("--procs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="sender processes to run each rate with (default 1,2)")
    a = ap.parse_args(argv)
    configure_logging("bench", level="warning")   # stdout is for the JSON only
    info = machine()
    payload = png_payload(a.payload_bytes)
    t_start = time.perf_counter()
    server = raw_server("oip", "oip")
    try:
        asyncio.run(reference(server.address, payload, argparse.Namespace(**{**vars(a), "ref_seconds": 1.0}),
                              server.pid))                          # warm-up
        before = asyncio.run(reference(server.address, payload, a, server.pid))
        # CPU a run spends outside sending: spawning and importing the sender processes
        startup = {procs: asyncio.run(loadgen(server.address, payload, 5.0, 0.2, seed=99, procs=procs))
                   ["loadgen_cpu_s"] for procs in a.procs}
        runs = []
        for i, m in enumerate(a.multiples):
            jitter = asyncio.run(idle_jitter_ms(a.seconds / 2))
            for procs in a.procs:
                runs.append(asyncio.run(loadgen(server.address, payload, m * before["req_per_s"], a.seconds,
                                                seed=i, procs=procs)))
                runs[-1]["multiple_of_raw"] = m
                runs[-1]["loadgen_cpu_ms_per_req_sending"] = r(
                    max(0.0, runs[-1]["loadgen_cpu_s"] - startup[procs]) / max(1, runs[-1]["sent"]) * 1e3, 3)
                runs[-1]["idle_asyncio_jitter_ms"] = r(jitter, 2)
        after = asyncio.run(reference(server.address, payload, a, server.pid))
    finally:
        server.stop()
    ref = (before["req_per_s"] + after["req_per_s"]) / 2
    on_time = [x["offered_req_per_s"] for x in runs if x["on_schedule"]]
    best = max(on_time) if on_time else 0.0
    by_procs = {}
    for procs in a.procs:
        mine = [x["offered_req_per_s"] for x in runs if x["on_schedule"] and x["procs"] == procs]
        top = max(mine) if mine else 0.0
        by_procs[str(procs)] = {"on_schedule_req_per_s": r(top, 1), "over_raw_server": r(top / ref),
                                "max_send_lag_ms": [x["max_send_lag_ms"] for x in runs if x["procs"] == procs]}
    print(json.dumps({
        "benchmark": "loadgen capacity", "machine": info,
        "settings": {"multiples": a.multiples, "seconds": a.seconds, "ref_seconds": a.ref_seconds,
                     "concurrency": a.concurrency, "payload_bytes": a.payload_bytes, "schedule": "poisson",
                     "procs": a.procs},
        "sender_startup_cpu_s": {str(k): r(v, 3) for k, v in startup.items()},
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "raw_server": {"req_per_s_before": r(before["req_per_s"], 1), "req_per_s_after": r(after["req_per_s"], 1),
                       "req_per_s": r(ref, 1), "server_cpu_s_per_s": r(before["server_cpu_s_per_s"], 2),
                       "closed_loop_client_cpu_ms_per_req": r(before["client_cpu_ms_per_req"], 3)},
        "loadgen_runs": runs,
        "on_schedule_req_per_s": r(best, 1),
        "on_schedule_rate_over_raw_server": r(best / ref),
        "by_procs": by_procs,
        "target_met": best / ref >= 1.0,
        "seconds": round(time.perf_counter() - t_start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
