"""Where one OCR request's time goes, phase by phase, from the times the services record
themselves (the front door's ``timing`` request parameter; docs/metrics.md, "Latency
breakdown").

    .venv/bin/python bench/bench_breakdown.py                 # 40 requests, about a minute
    .venv/bin/python bench/bench_breakdown.py --requests 20   # quicker

Starts a local OCR cluster (Redis, controller, one detection and one recognition worker,
two routers, as separate processes) on the real models with an operator plan
(``plans/ocr-demo.yaml`` by default), sends the evaluation pages one request at a time
with ``timing`` set, and prints JSON: for each phase its median in ms and that median's
share of the median end-to-end latency the client measured; the remainder (client p50
less the sum of the phase medians) and, per request, the client's latency less the front
door's total (the client <-> front door call); the hops (worker + transfer + router); and
the ratio of the request's model and pre/post-processing
time (preprocess + model + postprocess + crop_encode, per request) to its end-to-end
latency. Medians of parts do not add up to the median of the whole; the per-request sums
are given beside them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services.common import oip  # noqa: E402
from services.gen import inference_pb2_grpc as ipb_grpc  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.router.stats import PHASES  # noqa: E402
from services.tools.cluster import ClusterConfig, LocalCluster  # noqa: E402

WORK = ("preprocess", "model", "postprocess", "crop_encode")   # the request's own compute


def summarise(samples: list[tuple[float, dict]]) -> dict:
    """``samples``: (client end-to-end ms, the response's timing JSON) per request."""
    client = [c for c, _ in samples]
    p50 = statistics.median(client)
    phases = {p: statistics.median(t["phases_ms"][p] for _, t in samples) for p in PHASES}
    phases["unaccounted"] = statistics.median(t["unaccounted_ms"] for _, t in samples)
    server = statistics.median(t["total_ms"] for _, t in samples)
    work = [sum(t["phases_ms"][p] for p in WORK) for _, t in samples]
    hops = [sum(t["phases_ms"][p] for p in ("worker", "transfer", "router")) for _, t in samples]
    return {
        "client_e2e_p50_ms": round(p50, 2),
        "server_total_p50_ms": round(server, 2),
        "phases_p50": {p: {"ms": round(ms, 3), "share_of_e2e_p50": round(ms / p50, 4)}
                       for p, ms in phases.items()},
        "client_remainder_p50_ms": round(p50 - sum(phases.values()), 2),   # medians do not add up exactly
        "client_minus_server_p50_ms": round(statistics.median(c - t["total_ms"] for c, t in samples), 2),
        "hops_p50_ms": round(statistics.median(hops), 2),                  # worker + transfer + router
        "hops_share_of_e2e_p50": round(statistics.median(hops) / p50, 4),
        "work_p50_ms": round(statistics.median(work), 2),
        "work_over_e2e_p50": round(statistics.median(w / c for w, (c, _) in zip(work, samples)), 4),
        "rest_over_e2e_p50": round(   # 1 - work/e2e: queues, hops, front door, client <-> front door
            statistics.median((c - w) / c for w, (c, _) in zip(work, samples)), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--plan", type=Path, default=ROOT / "plans" / "ocr-demo.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--gap-s", type=float, default=0.05, help="pause between requests (low load)")
    a = ap.parse_args(argv)
    pages = [p.png for p in load_pages(a.data)]
    if not pages:
        raise SystemExit(f"no pages in {a.data} (make data)")
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(ClusterConfig(spec=ROOT / "pipelines" / "ocr.yaml", plan_file=a.plan,
                                             models=a.models, log_dir=Path(tmp) / "logs"))
        t_start = time.perf_counter()
        cluster.start()
        ready_s = time.perf_counter() - t_start
        samples: list[tuple[float, dict]] = []
        paths: set[str] = set()
        try:
            with grpc.insecure_channel(cluster.front_door,
                                       options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
                stub = ipb_grpc.GRPCInferenceServiceStub(ch)
                for i in range(a.requests + 2):     # the first two warm the path up, untimed
                    png = pages[i % len(pages)]
                    t0 = time.perf_counter()
                    resp = stub.ModelInfer(oip.build_image_request("ocr", png, timing=True), timeout=30)
                    client_ms = (time.perf_counter() - t0) * 1e3
                    params = oip.read_parameters(resp.parameters)
                    if i >= 2:
                        samples.append((client_ms, json.loads(params["timing"])))
                        paths.add(str(params["variant_path"]))
                    time.sleep(a.gap_s)
        finally:
            cluster.stop()
    out = {"plan": str(a.plan.relative_to(ROOT) if a.plan.is_relative_to(ROOT) else a.plan),
           "variant_paths": sorted(paths), "requests": len(samples), "cluster_ready_s": round(ready_s, 1),
           **summarise(samples), "example_timing": samples[len(samples) // 2][1]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
