"""Choose the cuDNN convolution algorithm search mode by measurement (run it on the GPU host).

    .venv/bin/python bench/bench_cudnn_search.py                                  # GPU host
    bash /tmp/dx/bundle/env.sh python3 bench/bench_cudnn_search.py --out /tmp/dx/cudnn.json
    .venv/bin/python bench/bench_cudnn_search.py --variants rec_v6tiny --max-batch 2 --runs 3   # CPU smoke

For each variant (``--variants``) and each mode (``--modes``: EXHAUSTIVE, HEURISTIC, DEFAULT)
it loads the model as a worker does (``ModelHost.load``: the session with
``cudnn_conv_algo_search=<mode>``, then the warm-up of every shape bucket at every batch size
up to ``--max-batch`` on a GPU) and prints the load time (warm-up included), then the
median and p95 of ``--runs`` warm batches per (bucket, batch size) for batch 1 and
``--max-batch``. Pick the mode with the lowest warm times whose load time is acceptable
(the worker's flag: ``--cudnn-conv-algo-search``). On a CPU host the mode does nothing
(the providers column says so); the command then only checks that the script runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.onnx import CUDNN_ALGO_SEARCH  # noqa: E402
from services.common.spec import load_spec  # noqa: E402
from services.worker.core import ModelHost  # noqa: E402


def measure(spec, models: Path, name: str, mode: str, max_batch: int, runs: int) -> dict:
    t0 = time.perf_counter()
    host = ModelHost.load(spec.variant(name), models, True, 1, spec.plugins, max_batch, mode)
    load_ms = (time.perf_counter() - t0) * 1e3
    warm = {}
    for item in host.warm_items or []:
        for size in sorted({1, max_batch}):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                host.processor.run_batch(host.session, [item] * size)
                times.append((time.perf_counter() - t) * 1e3)
            times.sort()
            warm[f"{item.bucket}/b{size}"] = {"p50_ms": round(statistics.median(times), 2),
                                              "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 2)}
    return {"variant": name, "mode": mode, "providers": host.providers, "load_ms": round(load_ms, 1),
            "shapes_warmed": len(host.warmed), "warm": warm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "pipelines" / "ocr.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--variants", default="det_v6small_640,rec_v6small")
    ap.add_argument("--modes", default=",".join(CUDNN_ALGO_SEARCH))
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    results = []
    for name in args.variants.split(","):
        for mode in args.modes.split(","):
            r = measure(spec, args.models, name, mode.strip().upper(), args.max_batch, args.runs)
            results.append(r)
            worst = max(r["warm"].values(), key=lambda x: x["p50_ms"]) if r["warm"] else {}
            print(f"{name:18s} {r['mode']:10s} providers={','.join(r['providers'])} load {r['load_ms']:.0f} ms "
                  f"({r['shapes_warmed']} shapes warmed); warm p50/p95 per bucket: "
                  + " ".join(f"{k}={v['p50_ms']}/{v['p95_ms']}" for k, v in r["warm"].items())
                  + (f"; slowest p50 {worst['p50_ms']} ms" if worst else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
