"""Simulated queries per wall-second (one core): the high-load comparison trace
(traffic analysis, 20 workers, 36,046 requests, ~650k sub-queries) with planner solves
cached by a warm-up run, so the number measures the event loop, not HiGHS.

    .venv/bin/python bench/bench_sim.py
"""
import time

from services.planner import load_profile
from services.sim import SimConfig, make_policy, simulate, trace_arrivals

if __name__ == "__main__":
    prof = load_profile("profiles/traffic_analysis.json")
    arr = trace_arrivals("traces/twitter_medium_normal.txt", 4.5, 1)
    simulate(prof, arr, make_policy("ours", prof, 20), SimConfig(n_workers=20, seed=1))   # warm the solve cache
    for policy in ("ours", "inferline"):
        best = None
        for _ in range(3):
            t = time.perf_counter()
            r = simulate(prof, arr, make_policy(policy, prof, 20), SimConfig(n_workers=20, seed=1))
            wall = time.perf_counter() - t
            best = wall if best is None else min(best, wall)
        print(f"{policy:10s} {r.requests} requests, {r.queries} queries, {r.batches} batches: "
              f"best {best:.2f} s wall = {r.queries / best:,.0f} simulated queries/s")
