"""Planner benchmark: solve time of the relaxed (LP + repair) and exact (MILP) planner,
and the relaxed solution's gap to exact.

    .venv/bin/python bench/bench_planner.py            # full run (several minutes, 2 cores)
    .venv/bin/python bench/bench_planner.py --quick    # smoke run

For each instance, demands sweep from hardware scaling to overload (fractions of the
instance's full-accuracy and unbounded capacities). Times are wall-clock per solve()
with the compiled model cached (the one-off build is reported separately). The gap is
lexicographic, like the objective: relative shortfall in served rate, then in expected
accuracy mass; in hardware mode the extra workers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.planner.capacity import max_demand  # noqa: E402
from services.planner.profile import load_profile  # noqa: E402
from services.planner.solver import PlannerContext, get_model, solve  # noqa: E402
from services.planner.synthetic import five_stage  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench(profile, n, fractions, repeats, exact_nodes, label):
    t = time.perf_counter()
    get_model(profile, profile.slo_ms, "p95", False)
    get_model(profile, profile.slo_ms, "p95", True)
    build_ms = (time.perf_counter() - t) * 1000
    full = max_demand(profile, n, method="relaxed", full_accuracy=True).served_qps
    top = max_demand(profile, n, method="relaxed").served_qps
    demands = [f * full for f in fractions[0]] + [f * top for f in fractions[1]]
    rel_t, ex_t, gaps = [], [], []
    for d in demands:
        for _ in range(repeats):
            r = solve(PlannerContext(profile, d, n))
            rel_t.append(r.solve_ms)
        e = solve(PlannerContext(profile, d, n, method="exact", node_limit=exact_nodes))
        ex_t.append(e.solve_ms)
        if not (r.ok and e.ok):
            gaps.append((d, "failed", r.status, e.status))
            continue
        served_gap = (e.served_qps - r.served_qps) / max(e.served_qps, 1e-9)
        am_r = r.served_qps * (r.expected_accuracy or 0)
        am_e = e.served_qps * (e.expected_accuracy or 0)
        acc_gap = (am_e - am_r) / max(am_e, 1e-9)
        gaps.append((d, e.mode, r.mode, served_gap, acc_gap, r.workers_used - e.workers_used, e.status))
    print(f"\n## {label}: N={n}, build {build_ms:.0f} ms, full-accuracy capacity {full:.1f} q/s, "
          f"max {top:.1f} q/s")
    print(f"relaxed solve ms: p50 {statistics.median(rel_t):.1f}  p95 {pct(rel_t, 0.95):.1f}  (n={len(rel_t)})")
    print(f"exact   solve ms: p50 {statistics.median(ex_t):.1f}  p95 {pct(ex_t, 0.95):.1f}  (n={len(ex_t)})")
    print("| demand q/s | exact mode | relaxed mode | served gap | accuracy-mass gap | extra workers | exact status |")
    print("|---:|---|---|---:|---:|---:|---|")
    worst = 0.0
    for g in gaps:
        if g[1] == "failed":
            print(f"| {g[0]:.1f} | failed | | | | | {g[2]} / {g[3]} |")
            continue
        d, em, rm, sg, ag, w, st = g
        worst = max(worst, sg, ag)
        print(f"| {d:.1f} | {em} | {rm} | {100 * sg:.3f}% | {100 * ag:.3f}% | {w:+d} | {st} |")
    print(f"worst relaxed gap to exact: {100 * worst:.3f}% (negative = relaxed better: exact hit its node limit/gap)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    traffic = load_profile(ROOT / "profiles" / "traffic_analysis.json")
    fr = ([0.5, 0.9], [0.3, 0.6, 0.9, 1.2]) if not args.quick else ([0.5], [0.6])
    reps = 1 if args.quick else 5
    for n in ([20] if args.quick else [20, 100, 1000]):
        bench(traffic, n, fr, reps, 50_000, "traffic_analysis")
    if not args.quick:
        bench(five_stage(), 100, ([0.5], [0.5, 1.2]), 3, 50_000,
              "synthetic 5-stage tree (t0 -> t1 -> {t2, t3}, t0 -> t4), 8 variants per stage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
