"""``make fidelity`` in miniature: services/tools/fidelity.py on a few seconds of a square
wave and of the compressed trace, each on a real cluster (Redis, controller, routers,
three pool workers, ONNX Runtime) and in the simulator. Checks that the same arrivals
reached both sides (every scheduled request is in the cluster's records and in each
simulated run), that the step windows add up, and that the table names every shape.
No number about quality is asserted (a few seconds on a busy 2-core machine say
nothing); docs/evaluation.md has the real run."""
from __future__ import annotations

import json
from pathlib import Path

from services.loadgen.records import read_records
from services.tools import fidelity

ROOT = Path(__file__).resolve().parents[2]


def test_short_fidelity_run_compares_the_same_arrivals(models_dir, eval_pages, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pages_dir, _ = eval_pages
    out, logs = tmp_path / "fid", tmp_path / "logs"
    rc = fidelity.main(["--out", str(out), "--log-dir", str(logs), "--shapes", "square7x,twitter",
                        "--duration", "6", "--period", "4", "--models", str(models_dir), "--pages", str(pages_dir),
                        "--calibration-cache", str(tmp_path / "profiles")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "== square7x:" in printed and "== twitter:" in printed    # a progress line per phase
    res = json.loads((out / "results.json").read_text())
    assert list(res["shapes"]) == ["square7x", "twitter"]
    for shape, r in res["shapes"].items():
        records = read_records(logs / f"{shape}.records.jsonl")
        n = len(records)
        assert n > 0 and sorted(x["index"] for x in records) == list(range(n))
        assert r["live"]["requests"] == n and sum(r["live"]["outcomes"].values()) == n
        for kind in ("live", "sim", "sim_measured"):
            if kind not in r:      # no measurement came back from the run
                continue
            m = r[kind]
            assert m["requests"] == n, (shape, kind)
            assert 0.0 <= m["violation_ratio"] <= 1.0
            sw = m["after_steps"]
            assert sw["up"]["requests"] == sum(s["requests"] for s in sw["steps"] if s["up"])
            assert all(0 <= s["violations"] <= s["requests"] for s in sw["steps"])
            assert m["plan_versions"] >= 1
        assert r["sim"]["config"]["report_s"] == 1.0 and r["sim"]["config"]["cold_start"] is True
    # 6 s at period 4: up at 2 s, down at 4 s (the next step up, at 6 s, is past the end)
    assert [s["t_s"] for s in res["shapes"]["square7x"]["steps"]] == [2.0, 4.0]
    assert res["shapes"]["twitter"]["steps"] == []
    # the same windows on both sides: the cluster's and the simulator's step windows hold
    # the same requests
    sq = res["shapes"]["square7x"]
    assert [s["requests"] for s in sq["live"]["after_steps"]["steps"]] == \
        [s["requests"] for s in sq["sim"]["after_steps"]["steps"]]
    md = (out / "results.md").read_text()
    assert "| square7x | cluster |" in md and "| twitter | simulator |" in md


def test_bad_shapes_fail_clearly(capsys):
    assert fidelity.main(["--shapes", "square7x,nonsense"]) == 2
    assert "--shapes" in capsys.readouterr().err
