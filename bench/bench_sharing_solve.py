"""How much the sharing-aware planner costs: solve time of a profile with and without its
sharing table (services/planner/solver.py solves once per cap on busy workers).

    .venv/bin/python bench/bench_sharing_solve.py [--profile profiles/ocr_cpu.json]

Prints, per cluster size and demand, the median wall time of a warm solve (compiled
models cached, as in the controller) and the solver calls it made.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from services.planner import PlannerContext, load_profile, solve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="profiles/ocr_cpu.json")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    shared = load_profile(a.profile)
    if not shared.sharing:
        raise SystemExit(f"{a.profile} has no sharing table (python -m services.tools.sharing --profile ...)")
    plain = replace(shared, sharing={})
    print(f"{'workers':>7} {'demand':>7} {'plain ms':>9} {'calls':>5} {'shared ms':>9} {'calls':>5} {'k':>4}")
    for n in (3, 6, 20):
        for d in (1.0, 5.0, 40.0):
            row = []
            for p in (plain, shared):
                solve(PlannerContext(p, d, n))                 # compile and warm the caches
                times, sol = [], None
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    sol = solve(PlannerContext(p, d, n))
                    times.append((time.perf_counter() - t) * 1e3)
                row += [statistics.median(times), sol.solver_calls]
            print(f"{n:>7} {d:>7.1f} {row[0]:>9.1f} {row[1]:>5} {row[2]:>9.1f} {row[3]:>5} {sol.sharing_k:>4}")


if __name__ == "__main__":
    main()
