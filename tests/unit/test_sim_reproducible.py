"""A simulator run is a function of its inputs (issue 11, item 4): the planner's limits
are counted in solver work, not seconds, no solve is warm-started from whatever the
cached model solved before, and nothing a run leaves behind in the process (solve
caches, compiled models) changes the next run. Each order runs in a fresh process so
the caches start empty, exactly as ``make reproduce`` starts."""
from __future__ import annotations

import json
import subprocess
import sys

RUN = r"""
import hashlib, json, sys
import numpy as np
from services.planner import load_profile
from services.sim.arrivals import trace_arrivals
from services.sim.engine import SimConfig, simulate
from services.sim.policies import make_policy
prof = load_profile("profiles/traffic_analysis.json")
arr = trace_arrivals("traces/twitter_medium_normal.txt", 4.5, 1)
arr = arr[(arr >= 40.0) & (arr < 100.0)] - 40.0      # the minute demand rises to its peak
out = {}
for name in sys.argv[1:]:
    r = simulate(prof, arr, make_policy(name, prof, 20), SimConfig(n_workers=20, seed=1))
    out[name] = {"violations": r.violation_ratio, "accuracy": r.effective_accuracy, "plans": r.plans,
                 "status": hashlib.sha256(r.status.tobytes()).hexdigest(),
                 "latency": hashlib.sha256(np.nan_to_num(r.latency_s, nan=-1.0).tobytes()).hexdigest()}
print(json.dumps(out))
"""


def _run(*policies: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, *policies], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_policies_give_the_same_results_in_either_order():
    first = _run("ours-no-drop", "ours", "proteus")
    second = _run("proteus", "ours", "ours-no-drop")
    assert first["ours"]["plans"] > 3          # the minute makes the planner re-plan
    assert first == second
