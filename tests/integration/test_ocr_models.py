"""Real PaddleOCR models through our processors (ONNX Runtime on CPU, one thread).

Needs ``models/`` filled by ``make models`` (pipeserve-fetch-models); fails, does not skip,
when it is missing.
"""
from pathlib import Path

import numpy as np
import pytest

from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import load_spec
from services.ocr.cer import page_cer
from services.ocr.local import run_ocr_page
from services.ocr.pages import generate_page

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SPEC = ROOT / "pipelines" / "ocr.yaml"


@pytest.fixture(scope="module")
def spec():
    spec = load_spec(SPEC)
    missing = [v.model for t in spec.tasks for v in t.variants if not (MODELS / v.model).is_file()]
    if missing:
        pytest.fail(f"model files missing under {MODELS}: {missing[:3]}... - run `make models` "
                    f"(pipeserve-fetch-models --dest models) first", pytrace=False)
    return spec


@pytest.fixture(scope="module")
def stages(spec):
    cache = {}

    def get(name):
        if name not in cache:
            proc = make_processor(spec.variant(name), MODELS, spec.plugins)
            session, providers = create_session(proc.model_path, prefer_gpu=False, intra_op_threads=1)
            assert providers == ["CPUExecutionProvider"]
            cache[name] = (proc, session)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def pages():
    return [generate_page(1234, i) for i in range(10)]


def test_reference_path_reads_generated_pages(stages, pages):
    det, rec = stages("det_v6small_480"), stages("rec_v6tiny")
    cers = []
    for page in pages:
        out = run_ocr_page(page.png, *det, *rec)
        cers.append(page_cer([(text, pts) for text, pts, _ in out], page.lines))
    assert np.mean(cers) < 0.1, f"per-page CER {np.round(cers, 3)}"


def test_every_variant_loads_and_produces_output(spec, stages, pages):
    det_proc, det_sess = stages("det_v6small_480")
    first = det_proc.run_batch(det_sess, [det_proc.prepare(pages[0].png)])[0]
    assert len(first.regions) == len(first.child_payloads) >= 5
    for variant in spec.task("det").variants:
        proc, sess = stages(variant.name)
        (res,) = proc.run_batch(sess, [proc.prepare(pages[0].png)])
        assert len(res.regions) >= 5, variant.name
        assert all(len(r.points) == 8 for r in res.regions)
    for variant in spec.task("rec").variants:
        proc, sess = stages(variant.name)
        out = proc.run_batch(sess, [proc.prepare(c) for c in first.child_payloads[:4]])
        assert len(out) == 4, variant.name
        assert any(r.regions[0].text for r in out), variant.name


def test_batch_of_four_pages_gives_the_same_boxes_as_one_by_one(stages, pages):
    proc, sess = stages("det_v6small_480")
    items = [proc.prepare(p.png) for p in pages[:4]]
    batched = proc.run_batch(sess, items)
    single = [proc.run_batch(sess, [it])[0] for it in items]
    for b, s in zip(batched, single):
        assert len(b.regions) == len(s.regions)
        np.testing.assert_allclose([r.points for r in b.regions], [r.points for r in s.regions], atol=1.0)


def test_recogniser_batch_matches_single_crops(stages, pages):
    det, (rec, rec_sess) = stages("det_v6small_480"), stages("rec_v6tiny")
    (res,) = det[0].run_batch(det[1], [det[0].prepare(pages[1].png)])
    items = [rec.prepare(c) for c in res.child_payloads]
    batched = [r.regions[0].text for r in rec.run_batch(rec_sess, items)]
    single = [rec.run_batch(rec_sess, [it])[0].regions[0].text for it in items]
    agree = sum(a == b for a, b in zip(batched, single))
    assert agree >= len(items) - 1, list(zip(batched, single))   # padding may flip one borderline char
