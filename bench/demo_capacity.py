"""How much load the demo cluster carries on this machine: the demo at rising rates.

    .venv/bin/python bench/demo_capacity.py                    # quiet machine
    .venv/bin/python bench/demo_capacity.py --busy 1           # beside one core of busy loop
    .venv/bin/python bench/demo_capacity.py --rates 4,8,12 --duration 20

For each rate, runs ``pipeserve-demo --rate R`` (the planner on this host's calibrated
profile, one detection and one recognition worker) and prints one JSON line: SLO
violation ratio (per request: late + dropped + shed + errors), p50/p99, mean CER, the
final plan's variants. ``--busy N`` starts N Python busy loops for the whole run (the
load CI machines carry). The carried load is the highest rate whose violations stay
within 1 %.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="4,6,9,12,15,18")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the run")
    a = ap.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    carried = 0.0
    try:
        for rate in [float(r) for r in a.rates.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "report.json"
                subprocess.run([sys.executable, "-m", "services.tools.demo", "--quiet", "--rate", str(rate),
                                "--duration", str(a.duration), "--json", str(out), "--log-dir", str(Path(tmp) / "logs")],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                r = json.loads(out.read_text())
            plan = r.get("final_plan") or {}
            row = {"rate": rate, "busy_loops": a.busy, "sent": r["sent"],
                   "violation_ratio": round(r["slo_violation_ratio"], 4),
                   "p50_ms": r["latency_p50_ms"] and round(r["latency_p50_ms"], 1),
                   "p99_ms": r["latency_p99_ms"] and round(r["latency_p99_ms"], 1),
                   "mean_cer": r["mean_cer"] and round(r["mean_cer"], 4),
                   "paths": r["variant_paths"], "final_plan_version": plan.get("version")}
            print(json.dumps(row), flush=True)
            if row["violation_ratio"] <= 0.01:
                carried = max(carried, rate)
    finally:
        for p in busy:
            p.kill()
    print(json.dumps({"carried_rate_within_1pct": carried, "busy_loops": a.busy}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
