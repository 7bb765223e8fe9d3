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
