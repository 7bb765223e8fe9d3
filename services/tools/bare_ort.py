"""The bare ONNX Runtime pipeline: what the cluster's pages/s are measured against.

One process, no gRPC, no queues: the root task's variant runs the pages in batches of its
batch size, then each child task's variant runs the payloads its parent produced (for OCR:
detection, then recognition of every line's crop), in batches of its own size. The CPU
work is included (``prepare`` of every item: decoding, resizing, normalising; the
parent's post-processing: DB boxes, crops and their encoding), exactly the work a
worker's batch does, so the ratio ``cluster pages/s / bare pages/s`` is what serving costs.

    python -m services.tools.bare_ort --provider cpu --variants det_v6small_320:8,rec_v6tiny:4
    python -m services.tools.bare_ort --provider cpu --demo-json runs/demo.json   # the demo's variants

Every page and crop runs once untimed first (warm shapes: on a GPU a new input shape's first
call is a cuDNN algorithm search), then ``--passes`` timed passes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class BareResult:
    pages: int
    seconds: float                       # the timed passes, all of them
    items: dict[str, int]                # task -> items run per pass
    task_seconds: dict[str, float]       # task -> seconds per pass (its share of ``seconds``)
    providers: dict[str, list[str]]      # task -> providers its session got

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0


def variants_from_report(report: Mapping, task_of: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """``task -> (variant, batch size)`` the cluster mostly ran in a load report (a demo's
    ``--json``): its most frequent variant path among OK answers, each variant at the batch
    size the final plan gives it (the largest, when workers differ), else the largest the
    final plan gives its task (a variant the plan left before the end), else 1.
    ``task_of`` maps variant -> task (the spec's)."""
    paths = Counter({k: int(v) for k, v in (report.get("variant_paths") or {}).items()})
    if not paths:
        raise ValueError("the report has no OK answers (no variant_paths): nothing to compare with")
    path = paths.most_common(1)[0][0].split("/")
    workers = list(((report.get("final_plan") or {}).get("workers") or {}).values())
    out = {}
    for variant in path:
        if variant not in task_of:
            raise ValueError(f"variant {variant!r} of the report is not in the spec")
        task = task_of[variant]
        sizes = ([int(w["batch_size"]) for w in workers if w.get("variant") == variant]
                 or [int(w["batch_size"]) for w in workers if w.get("task") == task] or [1])
        out[task] = (variant, max(sizes))
    return out


def parse_variants(text: str) -> list[tuple[str, int]]:
    """``det_v6small_320:8,rec_v6tiny:4`` -> ``[(variant, batch size), ...]``."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, b = item.partition(":")
        if not b.isdigit() or int(b) < 1:
            raise ValueError(f"expected VARIANT:BATCH with BATCH >= 1, got {item!r}")
        out.append((name, int(b)))
    return out


def run_pipeline(spec, models: Path, pages: list[bytes], chosen: Mapping[str, tuple[str, int]], *,
                 provider: str = "cpu", threads: int = 0, passes: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> BareResult:
    """Time ``passes`` passes of the pipeline over ``pages`` (see the module docstring).
    ``chosen`` maps every task to ``(variant, batch size)``; ``threads`` 0: ONNX
    Runtime's default (every core)."""
    from services.common.onnx import create_session
    from services.common.processing import make_processor

    missing = [t.name for t in spec.tasks if t.name not in chosen]
    if missing:
        raise ValueError(f"no variant chosen for task(s) {missing}")
    procs, sessions, providers = {}, {}, {}
    for t in spec.tasks:
        name, _ = chosen[t.name]
        proc = make_processor(spec.variant(name), models, spec.plugins)
        sessions[t.name], providers[t.name] = create_session(proc.model_path, prefer_gpu=provider == "cuda",
                                                             intra_op_threads=threads)
        procs[t.name] = proc
    if provider == "cuda" and any(p[:1] != ["CUDAExecutionProvider"] for p in providers.values()):
        raise RuntimeError(f"not every session got the CUDA provider first: {providers}")

    def one_pass(spent: dict[str, float], counts: dict[str, int]) -> None:
        pools: dict[str, list[bytes]] = {spec.root.name: list(pages)}
        for t in spec.tasks:            # parents before children
            items = pools.get(t.name, [])
            size = chosen[t.name][1]
            proc, sess = procs[t.name], sessions[t.name]
            t0 = clock()
            outs = []
            for i in range(0, len(items), size):
                outs += proc.run_batch(sess, [proc.prepare(x) for x in items[i:i + size]])
            spent[t.name] = spent.get(t.name, 0.0) + clock() - t0
            counts[t.name] = len(items)
            for c in t.children:
                pools[c] = [x for o in outs for x in o.child_payloads]

    one_pass({}, {})                    # warm: every shape once, arenas, caches
    spent: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = clock()
    for _ in range(max(1, passes)):
        one_pass(spent, counts)
    total = clock() - t0
    n = max(1, passes)
    return BareResult(len(pages) * n, total, counts, {k: v / n for k, v in spent.items()}, providers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bare-ort", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--pages", type=Path, default=Path("data/eval"))
    p.add_argument("--max-pages", type=int, default=20, help="pages per pass (default 20)")
    p.add_argument("--passes", type=int, default=2, help="timed passes (default 2)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default 0: every core)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--variants", help="VARIANT:BATCH per task, e.g. det_v6small_320:8,rec_v6tiny:4")
    src.add_argument("--demo-json", type=Path, help="a demo's --json report: its most used variants, and "
                                                    "its pages/s (goodput) to compare with")
    a = p.parse_args(argv)
    from services.common.spec import load_spec
    from services.ocr.pages import load_pages

    spec = load_spec(a.spec)
    report = json.loads(a.demo_json.read_text()) if a.demo_json else None
    try:
        if report is not None:
            chosen = variants_from_report(report, {v.name: t.name for t in spec.tasks for v in t.variants})
        else:
            chosen = {spec.variant(v).task: (v, b) for v, b in parse_variants(a.variants)}
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pages = [pg.png for pg in load_pages(a.pages)[:a.max_pages]]
    if not pages:
        print(f"error: no pages in {a.pages} (make data)", file=sys.stderr)
        return 2
    r = run_pipeline(spec, a.models, pages, chosen, provider=a.provider, threads=a.threads, passes=a.passes)
    print(format_bare(r, chosen, a.threads))
    if report is not None:
        print(format_ratio(float(report.get("goodput_rps") or 0.0), report.get("slo_violation_ratio"), r.pages_per_s))
    return 0


def format_bare(r: BareResult, chosen: Mapping[str, tuple[str, int]], threads: int) -> str:
    per = ", ".join(f"{t} {v} b{b}: {r.items.get(t, 0)} items {r.task_seconds.get(t, 0.0) * 1e3:.0f} ms"
                    for t, (v, b) in chosen.items())
    provs = sorted({p[0] for p in r.providers.values() if p})
    return (f"bare ONNX Runtime pipeline: {r.pages_per_s:.2f} pages/s ({r.pages} pages in {r.seconds:.2f} s; "
            f"per pass {per}; {', '.join(provs)}, {threads or os.cpu_count()} intra-op thread(s))")


def format_ratio(cluster_pages_s: float, violations, bare_pages_s: float) -> str:
    ratio = cluster_pages_s / bare_pages_s if bare_pages_s > 0 else 0.0
    v = f", {float(violations):.2%} violations" if violations is not None else ""
    return (f"cluster {cluster_pages_s:.2f} pages/s on time{v} = {ratio:.0%} of the bare pipeline's "
            f"{bare_pages_s:.2f} pages/s")


if __name__ == "__main__":
    raise SystemExit(main())
