"""Integration fixtures: real Redis, real gRPC services as separate processes, real
ONNX Runtime sessions on the real OCR models."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SPEC = ROOT / "pipelines" / "ocr.yaml"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS / "ppocrv6").is_dir():
        pytest.fail(f"{MODELS} has no models: run `make models` (pipeserve-fetch-models) first")
    return MODELS


@pytest.fixture(scope="session")
def eval_pages(tmp_path_factory):
    """12 generated pages with ground truth (seed 7: not the demo's page set)."""
    from services.ocr.pages import load_pages, write_pages

    out = tmp_path_factory.mktemp("pages")
    write_pages(out, 12, seed=7, progress=False)
    return out, load_pages(out)


@pytest.fixture()
def ocr_for_host(models_dir, eval_pages, tmp_path):
    """``make(keep) -> (spec, profile)``: pipelines/ocr.yaml and profiles/ocr_cpu.json
    restricted to the variants in ``keep`` (task -> names), the profile calibrated to this
    host by the demo's own speed probe (``pipeserve-calibrate``, a few seconds). Tests that
    plan for a load rate plan on it with cheap variants, so that a host 2-4x slower than
    the profile's (or one with a busy core) carries the load with room, and a failure is
    what the test is about, not a page's 12 recogniser lines queueing on a slow model."""
    import json

    import yaml

    from services.tools.calibrate import profile_for_host

    def make(keep: dict[str, list[str]]) -> tuple[Path, Path]:
        spec = yaml.safe_load(SPEC.read_text())
        for t in spec["tasks"]:
            t["variants"] = [v for v in t["variants"] if v["name"] in keep[t["name"]]]
        prof = json.loads((ROOT / "profiles" / "ocr_cpu.json").read_text())
        for t in prof["tasks"]:
            t["variants"] = [v for v in t["variants"] if v["name"] in keep[t["name"]]]
            if isinstance(t.get("fan_out"), dict):
                t["fan_out"] = {v: x for v, x in t["fan_out"].items() if v in keep[t["name"]]}
        prof["path_accuracy"] = {p: a for p, a in prof["path_accuracy"].items()
                                 if all(v in keep[t] for t, v in zip(("det", "rec"), p.split("/")))}
        spec_path, prof_path = tmp_path / "ocr-cheap.yaml", tmp_path / "ocr-cheap.json"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        prof_path.write_text(json.dumps(prof))
        pages_dir, _ = eval_pages
        path, _ = profile_for_host(spec_path, prof_path, models_dir, pages_dir, cache_dir=tmp_path / "probe",
                                   log=lambda _: None)
        return spec_path, path

    return make
