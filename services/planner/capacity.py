"""Capacity report: how much demand a fixed cluster serves, with and without accuracy scaling.

    python -m services.planner.capacity profiles/traffic_analysis.json --workers 18 --slo-ms 250

Prints the highest demand served at full accuracy (hardware scaling only), the best
single-path configuration (one variant and batch size per task) for comparison, then
the highest demand servable with accuracy scaling at expected end-to-end accuracy
floors of 0.95, 0.9, 0.8 and none, each with its ratio to the full-accuracy capacity.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass, replace

from services.planner.model import candidate_batches, dominated_variants
from services.planner.profile import PipelineProfile, load_profile
from services.planner.solver import PlannerContext, PlanSolution, solve

UNBOUNDED_QPS = 1e7


def max_demand(profile: PipelineProfile, n_workers: int, slo_ms: float | None = None,
               min_accuracy: float | None = None, full_accuracy: bool = False,
               method: str = "exact", quantile: str = "p95", node_limit: int = 50_000,
               task_workers: dict[str, int] | None = None, solver=solve,
               workers_per_device: int | None = None) -> PlanSolution:
    """The plan that serves the most demand under an accuracy floor (phase 1 of the
    planner with an unbounded demand). ``task_workers``: per-task caps (task-bound workers);
    ``solver``: ``solve`` or a caller's wrapper of it (the simulator caches solves);
    ``workers_per_device``: as ``PlannerContext`` (a profile with a sharing table)."""
    ctx = PlannerContext(profile, UNBOUNDED_QPS, n_workers, slo_ms=slo_ms, method=method,
                         latency_quantile=quantile, node_limit=node_limit, min_accuracy=min_accuracy,
                         task_workers=task_workers, workers_per_device=workers_per_device)
    if full_accuracy:
        probe = solver(replace(ctx, demand_qps=0.0), None)
        ctx = replace(ctx, min_accuracy=probe.max_accuracy * (1 - 1e-6))
    return solver(ctx, None)


@dataclass(frozen=True)
class SinglePath:
    choice: tuple[tuple[str, str, int], ...]   # (task, variant, batch) per task
    accuracy: float
    capacity_qps: float
    replicas: tuple[int, ...]


def single_path_capacity(profile: PipelineProfile, choice: dict[str, tuple[str, int]], n_workers: int,
                         quantile: str = "p95") -> tuple[float, list[int]]:
    """Capacity of one fixed (variant, batch) per task with integer workers: water-fill
    workers onto the bottleneck stage (optimal for max-min with integer counts)."""
    need = []   # workers per q/s of root demand, per task
    for t in profile.tasks:
        mult, cur = 1.0, t.name
        while (par := profile.parent_of(cur)) is not None:
            mult *= profile.task(par).fan_out[choice[par][0]][cur]
            cur = par
        v, b = choice[t.name]
        need.append(mult / profile.task(t.name).variant(v).throughput_qps(b, quantile))
    if n_workers < len(need):
        return 0.0, [0] * len(need)
    n = [1] * len(need)
    for _ in range(n_workers - len(need)):
        i = min(range(len(n)), key=lambda j: n[j] / need[j] if need[j] > 0 else math.inf)
        n[i] += 1
    cap = min(n[j] / need[j] if need[j] > 0 else math.inf for j in range(len(n)))
    return cap, n


def best_single_paths(profile: PipelineProfile, n_workers: int, slo_ms: float | None = None,
                      quantile: str = "p95") -> list[SinglePath]:
    """Every latency-feasible single-path configuration (leaf batch: the fastest that fits)."""
    budget = (slo_ms or profile.slo_ms) / 2.0
    dom = dominated_variants(profile, budget, quantile)
    options = {t.name: [(v.name, b) for v in t.variants if v.name not in dom
                        for b in candidate_batches(v, budget, quantile)] for t in profile.tasks}
    inner = [t.name for t in profile.tasks if t.children]
    leaves = [t.name for t in profile.tasks if not t.children]
    out = []
    for combo in itertools.product(*(options[t] for t in inner)):
        choice = dict(zip(inner, combo))
        per_leaf = []
        for leaf in leaves:
            spent, cur = 0.0, leaf
            while (par := profile.parent_of(cur)) is not None:
                spent += profile.task(par).variant(choice[par][0]).latency(choice[par][1], quantile)
                cur = par
            opts = []
            for v in profile.task(leaf).variants:
                fits = [b for vn, b in options[leaf]
                        if vn == v.name and spent + v.latency(b, quantile) <= budget + 1e-9]
                if fits:
                    opts.append((v.name, max(fits, key=lambda b: v.throughput_qps(b, quantile))))
            per_leaf.append(opts)
        for leaf_combo in itertools.product(*per_leaf):
            full = {**choice, **dict(zip(leaves, leaf_combo))}
            cap, n = single_path_capacity(profile, full, n_workers, quantile)
            accs = []
            for ch in profile.chains():
                a = 1.0
                for t in ch:
                    a *= profile.task(t).variant(full[t][0]).accuracy
                accs.append(profile.path_accuracy.get("/".join(full[t][0] for t in ch), a))
            out.append(SinglePath(tuple((t, *full[t]) for t in full), sum(accs) / len(accs), cap, tuple(n)))
    return sorted(out, key=lambda s: -s.capacity_qps)


def report(profile: PipelineProfile, n_workers: int, slo_ms: float | None = None,
           floors: tuple[float | None, ...] = (0.95, 0.9, 0.8, None), method: str = "exact",
           quantile: str = "p95") -> str:
    slo = slo_ms or profile.slo_ms
    lines = [f"capacity report: {profile.name}, {n_workers} workers, SLO {slo:g} ms "
             f"(latency {quantile}, batch budget SLO/2, {method})"]
    full = max_demand(profile, n_workers, slo, full_accuracy=True, method=method, quantile=quantile)
    base = full.served_qps
    lines.append(f"  full accuracy (hardware scaling only): {base:8.1f} q/s  accuracy {full.max_accuracy:.4f}  "
                 f"workers {full.workers_used}")
    singles = best_single_paths(profile, n_workers, slo, quantile)
    if singles:
        top = max(singles, key=lambda s: (s.accuracy, s.capacity_qps))
        fast = singles[0]
        lines.append(f"  best single path at full accuracy:     {top.capacity_qps:8.1f} q/s  "
                     f"({', '.join(f'{v}@{b}' for _, v, b in top.choice)})")
        lines.append(f"  best single path at any accuracy:      {fast.capacity_qps:8.1f} q/s  accuracy "
                     f"{fast.accuracy:.4f} ({', '.join(f'{v}@{b}' for _, v, b in fast.choice)})")
    for f in floors:
        sol = max_demand(profile, n_workers, slo, min_accuracy=f, method=method, quantile=quantile)
        label = "none" if f is None else f"{f:.2f}"
        ratio = sol.served_qps / base if base > 0 else math.inf
        acc = f"{sol.expected_accuracy:.4f}" if sol.expected_accuracy is not None else "-"
        lines.append(f"  accuracy scaling, floor {label:>4}:        {sol.served_qps:8.1f} q/s  accuracy {acc}  "
                     f"x{ratio:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.planner.capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="profile JSON (see profiles/README.md)")
    ap.add_argument("--workers", "-n", type=int, required=True, help="cluster size N")
    ap.add_argument("--slo-ms", type=float, default=None, help="end-to-end SLO (default: the profile's)")
    ap.add_argument("--method", choices=("exact", "relaxed"), default="exact")
    ap.add_argument("--quantile", choices=("p95", "p50"), default="p95", help="latency quantile used")
    args = ap.parse_args(argv)
    print(report(load_profile(args.profile), args.workers, args.slo_ms, method=args.method, quantile=args.quantile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
