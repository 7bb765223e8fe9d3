"""``make evaluate`` in miniature: services/tools/evaluate.py in --quick mode on a few
seconds of the compressed trace, all three policies on real clusters (Redis, controller,
routers, three pool workers, ONNX Runtime) and the simulator. Checks that every output
exists and that the counts agree: every scheduled request is in each run's records and
in the simulator's, and the phases' counts add up. No number about quality is asserted
(a few seconds on a busy 2-core machine say nothing); docs/evaluation.md has the real run."""
from __future__ import annotations

import json
from pathlib import Path

from services.loadgen.figures import FIGURES
from services.loadgen.records import read_records
from services.tools import evaluate

ROOT = Path(__file__).resolve().parents[2]


def test_quick_evaluation_writes_consistent_results(models_dir, eval_pages, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pages_dir, _ = eval_pages
    out = tmp_path / "ev"
    rc = evaluate.main(["--out", str(out), "--quick", "--duration", "6", "--models", str(models_dir),
                        "--pages", str(pages_dir), "--calibration-cache", str(tmp_path / "profiles"),
                        "--log-dir", str(tmp_path / "logs")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    n = res["trace"]["requests"]
    assert n > 0 and set(res["runs"]) == set(evaluate.DEFAULT_POLICIES)
    assert res["trace"]["peak_qps"] >= res["trace"]["full_capacity_qps"]   # the trace peaks above capacity
    for policy, r in res["runs"].items():
        records = read_records(tmp_path / "logs" / f"{policy}.records.jsonl")
        assert len(records) == n
        assert sorted(x["index"] for x in records) == list(range(n))
        history = json.loads((tmp_path / "logs" / f"{policy}.plan_history.json").read_text())
        assert history, policy
        for kind in ("real", "sim", "sim_measured"):
            if kind == "sim_measured" and kind not in r:   # no batch timings reached the controller
                continue
            m = r[kind]
            assert m["all"]["requests"] == n, (policy, kind)
            assert m["peak"]["requests"] + m["off"]["requests"] <= n
            for phase in ("all", "peak", "off"):
                p = m[phase]
                assert p["on_time"] + p["violations"] == p["requests"]
                assert p["on_time"] <= p["requests"]
            assert 0.0 <= m["all"]["violation_ratio"] <= 1.0
        assert sum(r["real"]["outcomes"].values()) == n
        assert r["real"]["all"]["ok"] == sum(1 for x in records if x["ok"])
        assert r["real"]["all"]["on_time"] == sum(1 for x in records if x["ok"] and x["on_time"])
    # the static run keeps every pool worker in its plan (none parks)
    assert res["runs"]["static"]["real"]["all"]["mean_active_workers"] == res["pool"]
    assert sum(a["replicas"] for a in res["static_plan"]) == res["pool"]
    for name in (*FIGURES, "cluster_vs_sim.png"):
        assert (out / "figures" / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert all(f"| {p} | cluster |" in md and f"| {p} | simulator |" in md for p in evaluate.DEFAULT_POLICIES)


def test_bad_arguments_fail_clearly(capsys):
    assert evaluate.main(["--policies", "planner,nonsense"]) == 2
    assert "--policies" in capsys.readouterr().err
    assert evaluate.main(["--pool", "1"]) == 2
    assert "--pool" in capsys.readouterr().err
