"""The bare ONNX Runtime pipeline gpu-check compares the cluster with
(services/tools/bare_ort.py), on the CPU with the real OCR models and pages."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.common.spec import load_spec
from services.tools import bare_ort

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_bare_pipeline_runs_det_then_rec_on_the_cpu_with_the_real_models(models_dir, eval_pages):
    _, pages = eval_pages
    r = bare_ort.run_pipeline(load_spec(ROOT / "pipelines" / "ocr.yaml"), models_dir, [p.png for p in pages[:2]],
                              {"det": ("det_v6tiny_320", 2), "rec": ("rec_v6tiny", 4)}, provider="cpu",
                              threads=1, passes=1)
    assert r.pages == 2 and r.items["det"] == 2 and r.items["rec"] > 2     # every line's crop was recognised
    assert r.providers == {"det": ["CPUExecutionProvider"], "rec": ["CPUExecutionProvider"]}
    assert r.pages_per_s > 0 and set(r.task_seconds) == {"det", "rec"}
    assert r.seconds >= sum(r.task_seconds.values()) * 0.99
