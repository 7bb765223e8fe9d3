"""The evaluation's windows and metrics (services/tools/evaluate.py), on hand-made inputs."""
from __future__ import annotations

import numpy as np

from services.loadgen.schedule import TraceEntry
from services.tools.evaluate import offered_rate, peak_trace_rate, phase_of, summarise


def test_offered_rate_counts_arrivals_per_window():
    starts, rates = offered_rate(np.array([0.1, 0.2, 1.5, 2.1, 2.2, 2.3, 2.4]), 1.0, 3.0)
    assert starts.tolist() == [0.0, 1.0, 2.0]
    assert rates.tolist() == [2.0, 1.0, 4.0]


def test_phases_split_at_capacity_and_half_of_it():
    starts, rates = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 4.0])
    ph = phase_of(np.array([0.5, 1.5, 2.5, 9.0]), starts, rates, 1.0, cap=4.0)
    # 1 <= 2: off-peak; 3 is neither; 4 >= 4: peak; past the end: the last window
    assert ph.tolist() == ["off", "", "peak", "peak"]


def test_peak_trace_rate_is_the_busiest_window():
    entries = [TraceEntry(ms, 0, 1000.0) for ms in (0, 100, 200, 5000, 9000)]
    assert peak_trace_rate(entries, 1.0) == 3.0
    assert peak_trace_rate(entries, 10.0) == 0.5


def test_summarise_counts_add_up():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    ok = np.array([True, True, False, True])
    good = np.array([True, False, False, True])   # the second was late
    cer = np.array([0.1, 0.3, np.nan, 0.2])
    phase = np.array(["off", "peak", "peak", ""])
    m = summarise(t, good, ok, cer, phase, np.array([0.0, 1.0]), np.array([2.0, 3.0]),
                  np.array(["off", "peak"]), {"all": 4.0, "peak": 2.0, "off": 1.0})
    assert m["all"] == {"requests": 4, "on_time": 2, "violations": 2, "violation_ratio": 0.5, "ok": 3,
                        "mean_cer": m["all"]["mean_cer"], "goodput_qps": 0.5, "mean_active_workers": 2.5}
    assert np.isclose(m["all"]["mean_cer"], 0.2)
    assert m["peak"]["violations"] == 2 and m["peak"]["goodput_qps"] == 0.0
    assert np.isclose(m["peak"]["mean_cer"], 0.3) and m["peak"]["mean_active_workers"] == 3.0
    assert m["off"]["violation_ratio"] == 0.0 and m["off"]["mean_active_workers"] == 2.0
