"""Synthetic profiles for tests and benchmarks (deterministic for a seed)."""
from __future__ import annotations

import numpy as np

from services.planner.profile import PipelineProfile, parse_profile


def synthetic_profile(parents: list[int | None], variants: int | list[int], seed: int = 0,
                      batches: tuple[int, ...] = (1, 2, 4, 8), slo_ms: float = 200.0,
                      name: str = "synthetic") -> PipelineProfile:
    """A tree of ``len(parents)`` tasks (``parents[i]`` is the index of task i's parent,
    None for the root, which must be task 0) with ``variants`` variants per task.

    Variants trade accuracy for speed (accuracy 0.6..1.0, per-item cost growing with
    accuracy); batching amortises a fixed cost; fan-out grows with the upstream variant's
    accuracy (a better detector finds more objects).
    """
    rng = np.random.default_rng(seed)
    n = len(parents)
    counts = [variants] * n if isinstance(variants, int) else list(variants)
    tasks = []
    for i in range(n):
        children = [f"t{j}" for j in range(n) if parents[j] == i]
        k = counts[i]
        accs = np.sort(rng.uniform(0.6, 1.0, size=k))
        accs[-1] = 1.0
        base = rng.uniform(2.0, 10.0)
        vs, fan = [], {}
        for j in range(k):
            item = base * (0.5 + 2.5 * (accs[j] - 0.6) / 0.4) * rng.uniform(0.9, 1.1)
            fixed = item * rng.uniform(0.5, 2.0)
            lat = {}
            for b in batches:
                p50 = fixed + item * b * rng.uniform(0.85, 1.0)
                lat[str(b)] = {"p50_ms": round(p50, 4), "p95_ms": round(p50 * rng.uniform(1.05, 1.3), 4)}
            vname = f"t{i}v{j}"
            vs.append({"name": vname, "accuracy": round(float(accs[j]), 4), "latency_ms": lat})
            if children:
                fan[vname] = {c: round(float(rng.uniform(0.5, 3.0) * (0.7 + 0.3 * accs[j])), 4) for c in children}
        t = {"name": f"t{i}", "children": children, "variants": vs}
        if children:
            t["fan_out"] = fan
        tasks.append(t)
    return parse_profile({"name": name, "slo_ms": slo_ms, "device": "synthetic", "provenance":
                          f"services.planner.synthetic seed={seed}", "tasks": tasks}, source=name)


def five_stage(seed: int = 0, variants: int = 8) -> PipelineProfile:
    """The benchmark's 5-stage tree: t0 -> t1 -> {t2, t3}, t0 -> t4 (three branches)."""
    return synthetic_profile([None, 0, 1, 1, 0], variants, seed=seed, batches=(1, 2, 4, 8), slo_ms=200.0,
                             name="synthetic5")
