"""Records files, plan-history samples and figures of the load generator, from synthetic
runs (services/loadgen/{report,records,plan_history,figures}.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from services.common.plan import Plan, WorkerAssignment
from services.loadgen import figures
from services.loadgen.plan_history import sample_from_plan, sample_from_status
from services.loadgen.records import read_plan_history, read_records, write_plan_history, write_records
from services.loadgen.report import RECORD_FIELDS, RequestResult, request_record, summarize


def synthetic_results(seed: int, n: int = 400, duration_s: float = 20.0) -> list[RequestResult]:
    """A run that degrades in its second half: later requests are slower, some dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(np.sort(rng.uniform(0, duration_s, n))):
        lag = float(rng.exponential(0.002))
        if t > duration_s / 2 and rng.random() < 0.2:
            out.append(RequestResult(i, "DEADLINE_EXCEEDED", 1.0 + lag, 1.0, t_s=float(t),
                                     send_lag_s=lag, message="dropped early"))
            continue
        latency = float(rng.gamma(4, 0.05 if t < duration_s / 2 else 0.2)) + lag
        path = "det_fast/rec_fast" if t > duration_s / 2 and rng.random() < 0.7 else "det_big/rec_big"
        out.append(RequestResult(i, "OK", latency, 1.0, cer=float(rng.uniform(0, 0.1)),
                                 plan_version=1 if t < 12 else 2, variant_path=path,
                                 t_s=float(t), send_lag_s=lag))
    return out


def history(duration_s: int = 20) -> list[dict]:
    samples = []
    for t in range(duration_s):
        big = 2 if t < 12 else 1
        samples.append({"t_s": float(t), "version": 1 if t < 12 else 2,
                        "workers": {"det/det_big": big, "det/det_fast": 2 - big, "rec/rec_big": 2},
                        "active_workers": 4, "parked": 0 if t < 12 else 1})
    samples.insert(5, {"t_s": 5.5, "error": "controller: timeout"})
    return samples


def test_a_record_counts_latency_from_the_scheduled_time_and_says_when_it_went_out():
    r = RequestResult(3, "OK", 0.25, 0.2, cer=0.01, plan_version=4, variant_path="a/b",
                      t_s=2.0, send_lag_s=0.05)
    rec = request_record(r)
    assert rec["scheduled_s"] == 2.0 and rec["sent_s"] == pytest.approx(2.05)
    assert rec["latency_ms"] == 250.0 and rec["send_lag_ms"] == 50.0
    assert rec["on_time"] is False and rec["ok"] is True   # 250 ms > the 200 ms SLO
    assert set(rec) == set(RECORD_FIELDS)
    capped = request_record(RequestResult(4, "CLIENT_IN_FLIGHT_CAP", None, 0.2, t_s=2.1))
    assert capped["sent_s"] is None and capped["latency_ms"] is None and capped["outcome"] == "CLIENT_IN_FLIGHT_CAP"


def test_the_report_carries_records_send_lag_and_plan_history():
    results = synthetic_results(0)
    report = summarize(results, elapsed_s=21.0, window_s=20.0, plan_history=history())
    assert len(report.records) == report.sent == 400
    assert report.send_lag_p50_ms is not None and report.send_lag_p99_ms >= report.send_lag_p50_ms
    d = json.loads(json.dumps(report.to_dict()))
    assert d["plan_history"][0]["version"] == 1 and len(d["plan_history"]) == 21


@pytest.mark.parametrize("name", ["r.jsonl", "r.csv"])
def test_records_round_trip_through_jsonl_and_csv(tmp_path, name):
    records = summarize(synthetic_results(1, n=50), elapsed_s=1.0).records
    back = read_records(write_records(tmp_path / name, records))
    assert back == records


def test_plan_history_reads_its_own_file_and_a_json_report(tmp_path):
    h = history()
    assert read_plan_history(write_plan_history(tmp_path / "h.json", h)) == h
    (tmp_path / "report.json").write_text(json.dumps({"sent": 1, "plan_history": h}))
    assert read_plan_history(tmp_path / "report.json") == h
    (tmp_path / "bad.json").write_text(json.dumps({"sent": 1}))
    with pytest.raises(ValueError, match="plan_history"):
        read_plan_history(tmp_path / "bad.json")


def test_samples_count_workers_per_task_and_variant():
    ws = {f"w{i}": WorkerAssignment(f"w{i}", f"h:{i}", task, variant, 4)
          for i, (task, variant) in enumerate([("det", "big"), ("det", "big"), ("rec", "small")])}
    plan = Plan(version=7, pipeline="ocr", workers=ws, routing={}, capacity_qps=12.5)
    s = sample_from_plan(plan, 3.0)
    assert s["version"] == 7 and s["workers"] == {"det/big": 2, "rec/small": 1}
    assert s["active_workers"] == 3 and s["capacity_qps"] == 12.5
    assert sample_from_plan(None, 0.0)["active_workers"] == 0
    status = {"plan": {"version": 3, "source": "planner", "capacity_qps": 9.0,
                       "allocations": [{"task": "det", "variant": "big", "batch_size": 4, "replicas": 2,
                                        "workers": ["w0", "w1"]}]},
              "workers": [{"worker_id": "w0", "state": "serving", "planned": {"task": "det"}},
                          {"worker_id": "w1", "state": "missing", "planned": {"task": "det"}},
                          {"worker_id": "w2", "state": "parked", "planned": None}],
              "demand": {"estimate_qps": 4.5}}
    s = sample_from_status(status, 1.0)
    assert s["workers"] == {"det/big": 2} and s["active_workers"] == 2
    assert (s["registered"], s["parked"], s["missing"], s["demand_qps"]) == (2, 1, 1, 4.5)


def test_windows_bin_requests_by_scheduled_time():
    records = summarize(synthetic_results(2), elapsed_s=21.0).records
    w = figures.windows(records, window_s=2.0)
    assert w.sent.sum() == len(records) and len(w.t) == 10
    assert np.all(w.on_time <= w.ok) and np.all(w.ok <= w.sent)
    assert w.violation_ratio[-1] > w.violation_ratio[0]        # the synthetic run degrades
    assert sum(v.sum() for v in w.variants.values()) == w.ok.sum()


def test_figures_of_one_and_of_two_runs_are_written(tmp_path):
    one = [figures.Run("greedy", summarize(synthetic_results(3), elapsed_s=21.0).records, history())]
    paths = figures.write_figures(one, tmp_path / "one")
    assert [p.name for p in paths] == list(figures.FIGURES)
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    two = one + [figures.Run("accurate", summarize(synthetic_results(4), elapsed_s=21.0).records)]
    assert all(p.stat().st_size > 5000 for p in figures.write_figures(two, tmp_path / "two", 2.0))


def test_the_figures_cli_reads_the_files(tmp_path, capsys):
    records = summarize(synthetic_results(5, n=100), elapsed_s=21.0).records
    write_records(tmp_path / "r.csv", records)
    write_plan_history(tmp_path / "h.json", history())
    assert figures.main([str(tmp_path / "r.csv"), str(tmp_path / "h.json"), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "workers.png").stat().st_size > 5000
    assert figures.main(["--run", f"a={tmp_path / 'r.csv'}", "--run", f"b={tmp_path / 'r.csv'},{tmp_path / 'h.json'}",
                         "--out", str(tmp_path / "g")]) == 0
    assert figures.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
