"""Measure what workers sharing one device cost each other, and write it into a profile.

    python -m services.tools.sharing --max-k 4 --profile profiles/ocr_cpu.json
    python -m services.tools.sharing --device auto --max-k 4 --profile profiles/ocr_gpu.json   # on the GPU host

For k = 1 .. ``--max-k``: start k processes, each a worker as the services run one (its own
ONNX Runtime session of a real variant, ``--threads`` intra-op threads, the CUDA
provider with ``--device auto`` where there is one), let each warm up, then keep all of
them running batches of ``--batch`` payloads (``prepare`` of every item + ``run_batch``,
what the profiler times) until every one has timed ``--repeats`` batches. A batch counts
only if it ended while all k were still running, so every sample is one of k busy
workers. The factor at k is the p50 of all k processes' samples over the p50 at k = 1.
``--runs R`` sweeps k = 1 .. N R times, interleaved, and pools each k's samples over the
sweeps (each sweep's own factors are printed too): on a host where other work comes and
goes, one sweep can catch a burst of it at one k -- a sweep whose k = 1 did read k = 2 as
0.41 -- while over interleaved sweeps every k meets about the same share of it.

With ``--profile`` the table goes into that profile's ``sharing`` under its device name
(``--device-name``: another key); the planner (``services.planner.sharing``) and the
simulator then model the contention. Measure on the host that will serve, with nothing
else running: a busy host measures its other load too.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.planner.profile import load_profile, write_profile


def _worker(spec_path: str, variant: str, models: str, pages: str, n_pages: int, batch: int, threads: int,
            device: str, warmup: int, ready: Any, go: Any, stop: Any, counts: Any, slot: int, out: Any) -> None:
    """One worker-like process: load, warm up, wait for the start, time batches until stopped."""
    from services.common.onnx import create_session
    from services.common.processing import make_processor
    from services.common.spec import load_spec
    from services.ocr.pages import load_pages

    spec = load_spec(spec_path)
    proc = make_processor(spec.variant(variant), Path(models), spec.plugins)
    session, providers = create_session(proc.model_path, prefer_gpu=device == "auto", intra_op_threads=threads)
    pool = [p.png for p in load_pages(pages)[:n_pages]]
    if not pool:
        raise SystemExit(f"no pages in {pages}")
    i = 0

    def one() -> float:
        nonlocal i
        items = [pool[(i * batch + j) % len(pool)] for j in range(batch)]
        i += 1
        t = time.perf_counter()
        proc.run_batch(session, [proc.prepare(x) for x in items])
        return (time.perf_counter() - t) * 1e3

    for _ in range(warmup):
        one()
    ready.release()
    go.wait()
    samples: list[float] = []
    while not stop.is_set():
        ms = one()
        if not stop.is_set():
            samples.append(ms)
            counts[slot] = len(samples)
    out.put((slot, samples, providers))


def measure_k(k: int, a: argparse.Namespace) -> tuple[list[float], list[str]]:
    """All timed batches of ``k`` concurrent workers (and the providers they got)."""
    ctx = mp.get_context("spawn")
    ready, go, stop = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    counts, out = ctx.Array("i", k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(a.spec), a.variant, str(a.models), str(a.pages), a.pages_n,
                                               a.batch, a.threads, a.device, a.warmup, ready, go, stop,
                                               counts, s, out), daemon=True)
             for s in range(k)]
    for p in procs:
        p.start()
    try:
        for _ in range(k):
            while not ready.acquire(timeout=1.0):
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a worker process failed while loading {a.variant}")
        go.set()
        while min(counts[:]) < a.repeats:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a worker process failed while running {a.variant}")
            time.sleep(0.05)
        stop.set()
        results = [out.get(timeout=120) for _ in range(k)]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [ms for _, s, _ in results for ms in s], results[0][2]


def factors(samples: dict[int, list[float]]) -> dict[int, float]:
    """``k -> p50(k) / p50(1)`` (rounded to 3 decimals; 1.0 at k = 1 by definition)."""
    base = statistics.median(samples[1])
    return {k: (1.0 if k == 1 else round(statistics.median(s) / base, 3)) for k, s in sorted(samples.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.tools.sharing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    p.add_argument("--variant", default="det_v6tiny_320", help="variant the workers run (a detector: pages in)")
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--pages", type=Path, default=Path("data/eval"))
    p.add_argument("--pages-n", type=int, default=20, help="pages the batches rotate through")
    p.add_argument("--batch", type=int, default=1, help="batch size of every timed batch")
    p.add_argument("--max-k", type=int, default=4,
                   help="most workers at once (measure up to as many as one device will hold)")
    p.add_argument("--repeats", type=int, default=30, help="timed batches per worker, at least")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per worker before the start")
    p.add_argument("--runs", type=int, default=1,
                   help="interleaved sweeps of k = 1 .. N; the table is from each k's samples of all of them")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session (the workers use 1)")
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="auto: CUDA where there is one")
    p.add_argument("--profile", type=Path, default=None, help="write the table into this profile's sharing")
    p.add_argument("--device-name", default=None, help="the table's key (default: the profile's device)")
    a = p.parse_args(argv)
    if a.max_k < 2 or a.batch < 1 or a.repeats < 1 or a.runs < 1:
        p.error("--max-k must be >= 2, --batch, --repeats and --runs >= 1")
    profile = load_profile(a.profile) if a.profile is not None else None
    key = (a.device_name or profile.device) if profile is not None else None
    if profile is not None and not key:
        p.error(f"{a.profile} names no device: give --device-name")
    providers: list[str] = []
    pooled: dict[int, list[float]] = {k: [] for k in range(1, a.max_k + 1)}
    for run in range(1, a.runs + 1):
        samples: dict[int, list[float]] = {}
        for k in range(1, a.max_k + 1):
            samples[k], providers = measure_k(k, a)
            print(f"run {run} k={k}: {len(samples[k])} batches, p50 {statistics.median(samples[k]):.1f} ms",
                  flush=True)
            pooled[k] += samples[k]
        print(f"run {run}: " + ", ".join(f"k={k} x{f:.3f}" for k, f in factors(samples).items()), flush=True)
    table = factors(pooled)
    print(f"{a.variant} batch {a.batch}, {providers[0] if providers else '?'}: sharing "
          + ", ".join(f"k={k} x{f:.3f}" for k, f in table.items())
          + (f" (the samples of {a.runs} runs)" if a.runs > 1 else ""))
    if profile is not None:
        updated = replace(profile, sharing={**profile.sharing, key: table})
        write_profile(updated, a.profile)
        print(f"wrote sharing[{key!r}] into {a.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
