"""``python -m services.tools.sharing`` on the real OCR models: two worker processes with
real ONNX Runtime sessions, and its table written into a copy of the shipped profile.
Also its pure parts (the ratio and the median over runs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.planner.profile import load_profile, profile_to_dict
from services.tools.sharing import factors, least_disturbed, main

ROOT = Path(__file__).resolve().parents[2]


def test_factors_are_p50_ratios_to_one_worker():
    assert factors({1: [10.0, 12.0, 11.0], 2: [22.0, 20.0, 30.0]}) == {1: 1.0, 2: 2.0}   # 22 / 11


def test_several_runs_keep_each_k_s_least_disturbed_p50():
    """p50s (ms) of three runs; the second caught other work at k = 1, the third at k = 2."""
    runs = [{1: 20.0, 2: 24.0, 3: 32.0}, {1: 50.0, 2: 22.0, 3: 30.0}, {1: 21.0, 2: 60.0, 3: 35.0}]
    assert least_disturbed(runs) == {1: 1.0, 2: 1.1, 3: 1.5}      # 22 / 20, 30 / 20


def test_measures_two_real_workers_and_writes_the_profile(models_dir, eval_pages, tmp_path, capsys):
    pages, _ = eval_pages
    profile = tmp_path / "ocr.json"
    shutil.copy(ROOT / "profiles" / "ocr_cpu.json", profile)
    before = load_profile(profile)
    assert main(["--max-k", "2", "--repeats", "3", "--warmup", "1", "--pages", str(pages), "--pages-n", "4",
                 "--models", str(models_dir), "--profile", str(profile), "--device-name", "this-host"]) == 0
    after = load_profile(profile)
    table = after.sharing["this-host"]
    assert set(table) == {1, 2} and table[1] == 1.0 and table[2] > 0
    assert "CPUExecutionProvider" in capsys.readouterr().out
    # everything else as it was
    rest = {k: v for k, v in profile_to_dict(after).items() if k != "sharing"}
    assert rest == {k: v for k, v in profile_to_dict(before).items() if k != "sharing"}


def test_a_profile_without_a_device_needs_a_name(tmp_path, capsys):
    d = tmp_path / "p.json"
    d.write_text('{"name": "one", "slo_ms": 100, "tasks": [{"name": "t", "variants": [{"name": "v", '
                 '"accuracy": 1.0, "latency_ms": {"1": {"p50_ms": 1, "p95_ms": 1}}}]}]}')
    with pytest.raises(SystemExit):
        main(["--max-k", "2", "--profile", str(d)])
