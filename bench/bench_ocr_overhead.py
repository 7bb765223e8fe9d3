"""What the cluster adds to one OCR request at low load, measured side by side.

    .venv/bin/python bench/bench_ocr_overhead.py              # 20 pages, ~1 minute
    .venv/bin/python bench/bench_ocr_overhead.py --pages 8    # quicker

1. **Alone**: in this process, for each page, the detector's ``prepare`` + ``run_batch``,
   then the recogniser's ``prepare`` of every crop + ``run_batch`` on all of them (one
   batch), with ONNX Runtime on one thread as the workers run it: the sum of the request's
   model and pre/post-processing time. This process takes the workers' malloc thresholds
   (``services.common.memory``), so the two halves decode pages with the same allocator.
2. **Cluster**: the same pages through the front door of a local cluster (Redis,
   controller, one detection and one recognition worker, two routers) running the same two
   variants, one request at a time; with ``--layouts`` (default both) also a second cluster
   whose one router process routes both stages (``inline``).

Prints JSON: p50/p90 of both, and the cluster's p50 as a ratio to the alone p50 (machines
differ up to ~4x in speed: the ratio is the figure that carries over). Both halves run in
the same script on the same pages, alternating rounds so background load hits both.
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
from services.common.logging import configure_logging  # noqa: E402
from services.common.memory import tune_malloc  # noqa: E402
from services.common.onnx import create_session  # noqa: E402
from services.common.processing import make_processor  # noqa: E402
from services.common.spec import load_spec  # noqa: E402
from services.gen import inference_pb2_grpc as ipb_grpc  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.tools.cluster import ClusterConfig, LocalCluster  # noqa: E402

from benchlib import pct  # noqa: E402  (bench/ is on sys.path when run as a script)

PLAN = """
pipeline: ocr
allocations:
  - {{task: det, variant: {det}, batch_size: 1, replicas: 1}}
  - {{task: rec, variant: {rec}, batch_size: 32, replicas: 1}}
"""


def alone(spec, models: Path, det: str, rec: str, pages: list[bytes]) -> list[float]:
    dp = make_processor(spec.variant(det), models, spec.plugins)
    ds, _ = create_session(dp.model_path, prefer_gpu=False, intra_op_threads=1)
    rp = make_processor(spec.variant(rec), models, spec.plugins)
    rs, _ = create_session(rp.model_path, prefer_gpu=False, intra_op_threads=1)
    out = []
    for png in [pages[0]] + pages:      # the first page warms the sessions up, untimed
        t = time.perf_counter()
        [d] = dp.run_batch(ds, [dp.prepare(png)])
        if d.child_payloads:
            rp.run_batch(rs, [rp.prepare(c) for c in d.child_payloads])
        out.append((time.perf_counter() - t) * 1000)
    return out[1:]


def through_cluster(stub, pages: list[bytes]) -> list[float]:
    out = []
    for png in [pages[0]] + pages:
        t = time.perf_counter()
        stub.ModelInfer(oip.build_image_request("ocr", png), timeout=30)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.05)
    return out[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--det", default="det_v6small_480")
    ap.add_argument("--rec", default="rec_v6tiny")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--layouts", type=lambda v: v.split(","), default=["per-stage", "inline"],
                    help="router layouts to measure, each its own cluster, rounds alternating: "
                         "per-stage (a router process per stage) and/or inline (one router "
                         "process routes both stages); default both")
    a = ap.parse_args(argv)
    if not a.layouts or set(a.layouts) - {"per-stage", "inline"}:
        ap.error(f"--layouts takes per-stage and/or inline, got {a.layouts}")
    configure_logging("bench", level="warning")   # stdout is for the JSON only
    tune_malloc()   # as the workers do: what the cluster adds, not what the allocator changes
    spec_path = ROOT / "pipelines" / "ocr.yaml"
    spec = load_spec(spec_path)
    pages = [p.png for p in load_pages(a.data)[: a.pages]]
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.yaml"
        plan.write_text(PLAN.format(det=a.det, rec=a.rec))
        clusters = {layout: LocalCluster(ClusterConfig(spec=spec_path, plan_file=plan, models=a.models,
                                                       log_dir=Path(tmp) / f"logs-{layout}",
                                                       inline_routers=layout == "inline"))
                    for layout in a.layouts}
        channels = {}
        try:
            for layout, cluster in clusters.items():
                cluster.start()
                channels[layout] = grpc.insecure_channel(
                    cluster.front_door, options=[("grpc.max_send_message_length", 64 << 20)])
            a_ms: list[float] = []
            c_ms: dict[str, list[float]] = {layout: [] for layout in clusters}
            for _ in range(a.rounds):
                a_ms += alone(spec, a.models, a.det, a.rec, pages)
                for layout in clusters:
                    c_ms[layout] += through_cluster(ipb_grpc.GRPCInferenceServiceStub(channels[layout]), pages)
        finally:
            for ch in channels.values():
                ch.close()
            for cluster in clusters.values():
                cluster.stop()
    p50a = statistics.median(a_ms)
    out = {"variants": f"{a.det}/{a.rec}", "pages": len(pages), "rounds": a.rounds,
           "alone_p50_ms": round(p50a, 1), "alone_p90_ms": round(pct(a_ms, 0.9), 1)}
    for layout, ms in c_ms.items():
        key = "cluster" if layout == "per-stage" else "cluster_inline"
        p50c = statistics.median(ms)
        out.update({f"{key}_p50_ms": round(p50c, 1), f"{key}_p90_ms": round(pct(ms, 0.9), 1),
                    f"{key}_added_p50_ms": round(p50c - p50a, 1),
                    f"{key}_over_alone_p50": round(p50c / p50a, 3),
                    f"{key}_within_15pct": p50c / p50a <= 1.15})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
