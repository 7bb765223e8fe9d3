"""A steady client beside another client's bursts of large uploads, on real processes:
how many of the steady client's requests are on time, and which failures were the
client's own deadline firing rather than an answer from the server.

    .venv/bin/python bench/bench_fair_front_door.py             # starts an OCR cluster, ~40 s
    .venv/bin/python bench/bench_fair_front_door.py --runs 3 --duration 20
    .venv/bin/python bench/bench_fair_front_door.py --target HOST:PORT --redis-url URL

Without ``--target`` it starts a local cluster (embedded Redis, the controller, one
detection and one recognition worker, two routers: pipelines/ocr.yaml with the plan of
tests/integration/test_bad_input.py) and stops it at the end.

Two clients, each with its own process and channel (so its own connection):

- **burst**: ``--burst`` requests of ``--burst-mib`` MiB at once (real pages padded with
  an ancillary PNG chunk, so they still read), waits for every answer, and again, back
  to back, for ``--duration`` seconds;
- **steady**: ``--rate`` requests a second at fixed intervals (real pages, ~1 MB), for the
  same ``--duration`` seconds, starting once the first burst is on its way.

``--burst 0`` leaves the burst client out: the steady client alone, at a ``--rate`` past
what the cluster carries, shows who answers the requests that miss their deadline.

Each run first sends 3 rounds of 4 pages at once, not measured (a fresh cluster's first
model runs are slow).

Every call has a gRPC deadline of ``--timeout-ms`` (1,500 ms, the OCR SLO). A failure is
``client_deadline`` when its status is DEADLINE_EXCEEDED with gRPC's own message
("Deadline Exceeded", from the client's timer or gRPC's): no answer from the front door,
which writes its own messages. With ``--redis-url`` (or a cluster it started) the front
door's counters (``arrived`` and the outcomes; its demand report, once a second) are read
before and after and compared with the clients' tallies.

``--json FILE`` writes the runs; ``--role burst`` is the burst client's own process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common import oip  # noqa: E402

PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6small_480, batch_size: 2, replicas: 1}
  - {task: rec, variant: rec_v6tiny, batch_size: 16, replicas: 1}
"""
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
OUTCOME_OF_CODE = {"OK": "ok", "DEADLINE_EXCEEDED": "dropped", "RESOURCE_EXHAUSTED": "shed",
                   "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not_found"}


def client_deadline(code: str, message: str) -> bool:
    """A DEADLINE_EXCEEDED that no front door wrote: gRPC's own "Deadline Exceeded" (the
    client's deadline fired first, or gRPC's on the server's side)."""
    return code == "DEADLINE_EXCEEDED" and "Deadline Exceeded" in message


def padded_page(png: bytes, size: int, seed: int) -> bytes:
    """A real page with an ancillary chunk of random bytes after IHDR, to ``size`` bytes."""
    import random
    pad = size - len(png) - 12
    junk = random.Random(seed).randbytes(pad)
    body = b"paDd" + junk
    chunk = struct.pack(">I", len(junk)) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]


def pages(directory: Path, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("p*.png"))[:n]]


async def _call(stub, body: bytes, timeout_s: float, client: str, t0: float) -> dict:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    code, message = "OK", ""
    try:
        await stub(body, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        code, message = exc.code().name, exc.details() or ""
    return {"client": client, "t_s": round(sent - t0, 4), "latency_s": round(loop.time() - sent, 4),
            "code": code, "message": message[:200]}


async def burst_client(target: str, pages_dir: Path, n: int, mib: float, duration_s: float,
                       timeout_s: float) -> list[dict]:
    payloads = [oip.build_image_request("ocr", padded_page(p, int(mib * 2**20), i)).SerializeToString()
                for i, p in enumerate(pages(pages_dir, 5))]
    out: list[dict] = []
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        t0 = asyncio.get_running_loop().time()
        print("SENDING", flush=True)
        while asyncio.get_running_loop().time() - t0 < duration_s:
            out += await asyncio.gather(*[_call(stub, payloads[i % len(payloads)], timeout_s, "burst", t0)
                                          for i in range(n)])
    return out


async def steady_client(target: str, pages_dir: Path, rate: float, duration_s: float,
                        timeout_s: float) -> list[dict]:
    bodies = [oip.build_image_request("ocr", p).SerializeToString() for p in pages(pages_dir, 8)]
    async with grpc.aio.insecure_channel(target) as ch:
        stub = ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            tasks.append(asyncio.create_task(_call(stub, bodies[i % len(bodies)], timeout_s, "steady", t0)))
        return list(await asyncio.gather(*tasks))


def summarize(records: list[dict], slo_s: float) -> dict:
    out = {}
    for client in ("steady", "burst"):
        rs = [r for r in records if r["client"] == client]
        codes = Counter(r["code"] for r in rs)
        failed = [r for r in rs if r["code"] != "OK"]
        own = [r for r in failed if client_deadline(r["code"], r["message"])]
        on_time = sum(1 for r in rs if r["code"] == "OK" and r["latency_s"] <= slo_s)
        late = sorted(r["latency_s"] for r in failed if r["code"] == "DEADLINE_EXCEEDED")
        out[client] = {"sent": len(rs), "on_time": on_time,
                       "on_time_share": round(on_time / len(rs), 4) if rs else None,
                       "codes": dict(sorted(codes.items())), "failed": len(failed),
                       "client_deadline": len(own),
                       "client_deadline_share": round(len(own) / len(failed), 4) if failed else 0.0,
                       "deadline_answer_s": [late[0], late[-1]] if late else None}
    return out


def frontdoor_counts(redis_url: str) -> dict[str, int]:
    """The sum over the pipeline's front doors of their last demand report."""
    import redis
    r = redis.Redis.from_url(redis_url)
    total: Counter = Counter()
    for key in r.scan_iter("pipeserve:ocr:frontdoor:*"):
        for k, v in r.hgetall(key).items():
            if k != b"ts":
                total[k.decode()] += int(float(v))
    r.close()
    return dict(total)


def compare(before: dict, after: dict, records: list[dict]) -> dict:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    client = Counter(OUTCOME_OF_CODE.get(r["code"], "failed") for r in records)
    client_deadlines = sum(client_deadline(r["code"], r["message"]) for r in records)
    return {"front_door": {k: delta.get(k, 0) for k in ("arrived", "ok", "dropped", "expired", "shed",
                                                         "invalid", "failed", "cancelled")},
            "clients": {"sent": len(records), **dict(client), "client_deadline": client_deadlines}}


def warm_up(target: str, pages_dir: Path, rounds: int = 3, at_once: int = 4) -> None:
    """Pages, ``at_once`` at a time, not measured: a fresh cluster's first model runs are
    slow, and ONNX Runtime's first run of each input shape (batches of 1 and 2 pages, of
    more or fewer lines) too."""
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        bodies = [oip.build_image_request("ocr", p).SerializeToString() for p in pages(pages_dir, 8)]
        for r in range(rounds):
            futures = [call.future(bodies[(r * at_once + i) % len(bodies)], timeout=30) for i in range(at_once)]
            for f in futures:
                try:
                    f.result()
                except grpc.RpcError:
                    pass   # a warm-up answer that failed still ran the models


def run_once(target: str, pages_dir: Path, a, redis_url: str | None) -> dict:
    warm_up(target, pages_dir)
    if redis_url:
        time.sleep(1.5)   # the warm-up in the front door's counters before they are read
    before = frontdoor_counts(redis_url) if redis_url else None
    burst = None
    if a.burst > 0:
        burst = subprocess.Popen(
            [sys.executable, __file__, "--role", "burst", "--target", target, "--pages", str(pages_dir),
             "--burst", str(a.burst), "--burst-mib", str(a.burst_mib), "--duration", str(a.duration),
             "--timeout-ms", str(a.timeout_ms)], stdout=subprocess.PIPE, text=True)
        assert burst.stdout.readline().strip() == "SENDING", "the burst client did not start"
        time.sleep(0.2)   # its first burst is on the wire
    steady = asyncio.run(steady_client(target, pages_dir, a.rate, a.duration, a.timeout_ms / 1e3))
    records = steady + (json.loads(burst.communicate(timeout=a.duration + 120)[0]) if burst else [])
    run = {"summary": summarize(records, a.timeout_ms / 1e3), "records": records}
    if redis_url:
        time.sleep(2.5)   # the front door reports its counters once a second
        run["counters"] = compare(before, frontdoor_counts(redis_url), records)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", help="a running front door (default: start a local OCR cluster)")
    ap.add_argument("--redis-url", help="its Redis, to compare the front door's counters")
    ap.add_argument("--pages", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--burst-mib", type=float, default=7.0)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--timeout-ms", type=float, default=1500.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--router-args", default="", help="extra front door flags (e.g. --answer-margin-ms 0)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--role", choices=("burst",), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "burst":
        print(json.dumps(asyncio.run(burst_client(a.target, a.pages, a.burst, a.burst_mib, a.duration,
                                                  a.timeout_ms / 1e3))))
        return 0
    cluster = None
    target, redis_url = a.target, a.redis_url
    if target is None:
        from services.tools.cluster import ClusterConfig, LocalCluster
        tmp = Path(tempfile.mkdtemp(prefix="bench-fair-"))
        (tmp / "plan.yaml").write_text(PLAN)
        cluster = LocalCluster(ClusterConfig(spec=ROOT / "pipelines" / "ocr.yaml", plan_file=tmp / "plan.yaml",
                                             models=a.models, workers={"det": 1, "rec": 1}, log_dir=tmp / "logs"))
        if a.router_args:
            _extra_router_args(a.router_args.split())
        cluster.start(ready_timeout_s=120)
        target, redis_url = cluster.front_door, cluster.redis_url
        print(f"cluster up (logs {tmp / 'logs'})", file=sys.stderr)
    try:
        runs = [run_once(target, a.pages, a, redis_url) for _ in range(a.runs)]
    finally:
        if cluster is not None:
            cluster.stop()
    for i, run in enumerate(runs):
        print(f"run {i + 1}: " + json.dumps(run["summary"]))
        if "counters" in run:
            print(f"  counters: " + json.dumps(run["counters"]))
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs}, indent=1))
    return 0


def _extra_router_args(extra: list[str]) -> None:
    """Give every router process ``extra`` flags (the local cluster has no option for it)."""
    from services.tools import cluster as cluster_mod
    spawn = cluster_mod.LocalCluster._spawn

    def with_extra(self, name, module, args, address=""):
        if module == "services.router.main":
            args = [*args, *extra]
        return spawn(self, name, module, args, address)

    cluster_mod.LocalCluster._spawn = with_extra


if __name__ == "__main__":
    raise SystemExit(main())
