"""``python -m services.tools.sharing`` on the real OCR models: two worker processes with
real ONNX Runtime sessions, and its table written into a copy of the shipped profile.
Also its pure parts (the ratio and the median over runs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.planner.profile import load_profile, profile_to_dict
from services.tools.sharing import factors, main

ROOT = Path(__file__).resolve().parents[2]


def test_factors_are_p50_ratios_to_one_worker():
    assert factors({1: [10.0, 12.0, 11.0], 2: [22.0, 20.0, 30.0]}) == {1: 1.0, 2: 2.0}   # 22 / 11


def test_measures_two_real_workers_and_writes_the_profile(models_dir, eval_pages, tmp_path, capsys):
    pages, _ = eval_pages
    profile = tmp_path / "ocr.json"
    shutil.copy(ROOT / "profiles" / "ocr_cpu.json", profile)
    before = load_profile(profile)
    assert main(["--max-k", "2", "--repeats", "3", "--warmup", "1", "--runs", "2", "--pages", str(pages), "--pages-n", "4",
                 "--models", str(models_dir), "--profile", str(profile), "--device-name", "this-host"]) == 0
    after = load_profile(profile)
    table = after.sharing["this-host"]
    assert set(table) == {1, 2} and table[1] == 1.0 and table[2] > 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out and "run 2: k=1 x1.000" in out
    # everything else as it was
    rest = {k: v for k, v in profile_to_dict(after).items() if k != "sharing"}
    assert rest == {k: v for k, v in profile_to_dict(before).items() if k != "sharing"}


def test_a_profile_without_a_device_needs_a_name(tmp_path, capsys):
    d = tmp_path / "p.json"
    d.write_text('{"name": "one", "slo_ms": 100, "tasks": [{"name": "t", "variants": [{"name": "v", '
                 '"accuracy": 1.0, "latency_ms": {"1": {"p50_ms": 1, "p95_ms": 1}}}]}]}')
    with pytest.raises(SystemExit):
        main(["--max-k", "2", "--profile", str(d)])
