"""The folded uint8 models (``<name>.u8.onnx``, normalisation in the graph) against the float
path (CPU normalisation), on the real models and the eval pages: same probability maps and
class scores within float rounding, same boxes and the same CER. Also the raw crop payloads
det can send rec (no JPEG): rec reads exactly the crop det cut.

Needs ``models/`` and ``data/eval`` from ``make models data``; fails, does not skip, without.
"""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import load_spec
from services.ocr.cer import page_cer
from services.ocr.images import decode_image
from services.ocr.pages import load_pages

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SPECS = [ROOT / "pipelines" / "ocr.yaml", ROOT / "pipelines" / "ocr_tree.yaml"]
TOL = 1e-4   # float32 rounding of the folded affine (x * 1/(255 std) - mean/std) through the network


class Recorder:
    """A session that keeps what each ``run`` returned."""

    def __init__(self, session):
        self.session, self.outputs = session, []

    def run(self, names, feeds):
        out = self.session.run(names, feeds)
        self.outputs.append(out[0])
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.fixture(scope="module")
def pages():
    pages = load_pages(ROOT / "data" / "eval")
    assert len(pages) >= 20, "run `make data` first"
    return pages


@pytest.fixture(scope="module")
def stage():
    specs = {p.name: load_spec(p) for p in SPECS}
    cache = {}

    def get(name, fold=True, spec="ocr.yaml", **settings):
        key = (name, fold, spec, tuple(sorted(settings.items())))
        if key not in cache:
            s = specs[spec]
            v = s.variant(name)
            v = dataclasses.replace(v, settings={**v.settings, "fold_normalisation": fold, **settings})
            proc = make_processor(v, MODELS, s.plugins)
            assert (proc.folded is not None) == fold, f"{name}: folded model missing (make models)"
            session, _ = create_session(proc.model_path, prefer_gpu=False, intra_op_threads=1)
            cache[key] = (proc, session)
        return cache[key]
    return get


def test_every_ocr_variant_runs_its_folded_model():
    for path in SPECS:
        spec = load_spec(path)
        for task in spec.tasks:
            for v in task.variants:
                proc = make_processor(v, MODELS, spec.plugins)
                assert proc.model_path.name.endswith(".u8.onnx"), f"{path.name} {v.name}: {proc.model_path}"


@pytest.mark.parametrize("det_name", ["det_v6small_320", "det_v4_640"])   # ImageNet and 0.5 constants
def test_folded_detector_gives_the_float_maps_and_boxes(stage, pages, det_name):
    (fdet, fsess), (det, sess) = stage(det_name), stage(det_name, fold=False)
    for page in pages[:8]:
        got, want = Recorder(fsess), Recorder(sess)
        a = fdet.run_batch(got, [fdet.prepare(page.png)])[0]
        b = det.run_batch(want, [det.prepare(page.png)])[0]
        assert got.outputs[0].shape == want.outputs[0].shape
        assert np.abs(got.outputs[0] - want.outputs[0]).max() < TOL
        assert len(a.regions) == len(b.regions) > 0
        for ra, rb in zip(a.regions, b.regions):
            assert np.abs(np.subtract(ra.points, rb.points)).max() <= 0.2   # rounded to 0.1 px


def _crops(stage, pages):
    det, sess = stage("det_v6small_320", fold=False, crop_format="png")
    return [c for p in pages for c in det.run_batch(sess, [det.prepare(p.png)])[0].child_payloads]


@pytest.mark.parametrize("name,spec", [("rec_v6tiny", "ocr.yaml"), ("rec_v6small", "ocr.yaml"),
                                       ("cls_mobile_v2", "ocr_tree.yaml")])
def test_folded_line_models_give_the_float_scores(stage, pages, name, spec):
    crops = _crops(stage, pages[:6])
    (fproc, fsess), (proc, sess) = stage(name, spec=spec), stage(name, fold=False, spec=spec)
    for start in range(0, len(crops), 8):
        chunk = crops[start:start + 8]
        got, want = Recorder(fsess), Recorder(sess)
        a = fproc.run_batch(got, [fproc.prepare(c) for c in chunk])
        b = proc.run_batch(want, [proc.prepare(c) for c in chunk])
        for x, y in zip(got.outputs, want.outputs):
            assert x.shape == y.shape and np.abs(x - y).max() < TOL
        assert [r.regions[0].text or r.regions[0].label for r in a] == \
               [r.regions[0].text or r.regions[0].label for r in b]


def _page_cer(stage, pages, fold, crop_format="jpeg"):
    det, dsess = stage("det_v6small_320", fold=fold, crop_format=crop_format)
    rec, rsess = stage("rec_v6tiny", fold=fold)
    cers = []
    for page in pages:
        d = det.run_batch(dsess, [det.prepare(page.png)])[0]
        items = [rec.prepare(c) for c in d.child_payloads]
        texts = [r for k in range(0, len(items), 8) for r in rec.run_batch(rsess, items[k:k + 8])]
        cers.append(page_cer([(t.regions[0].text, box.points) for box, t in zip(d.regions, texts)], page.lines))
    return float(np.mean(cers))


def test_folded_models_read_the_eval_pages_as_well(stage, pages):
    folded, float_ = _page_cer(stage, pages, True), _page_cer(stage, pages, False)
    print(f"\nmean page CER over {len(pages)} eval pages, det_v6small_320/rec_v6tiny: "
          f"folded {folded:.4f}, float {float_:.4f}")
    assert folded == pytest.approx(float_, abs=1e-3)


def test_raw_crops_give_rec_exactly_the_crop_det_cut(stage, pages):
    """PNG is lossless, so its decoded crops are the crops det cut: raw ones must equal them
    pixel for pixel, and rec must read them to the same texts and confidences."""
    raw_det, raw_sess = stage("det_v6small_320", crop_format="raw")
    png_det, png_sess = stage("det_v6small_320", crop_format="png")
    rec, rsess = stage("rec_v6tiny")
    for page in pages[:6]:
        raw = raw_det.run_batch(raw_sess, [raw_det.prepare(page.png)])[0]
        png = png_det.run_batch(png_sess, [png_det.prepare(page.png)])[0]
        assert raw.regions == png.regions and len(raw.child_payloads) == len(png.regions) > 0
        for r, p in zip(raw.child_payloads, png.child_payloads):
            assert np.array_equal(decode_image(r), decode_image(p))
        read = [rec.run_batch(rsess, [rec.prepare(c) for c in cs]) for cs in (raw.child_payloads, png.child_payloads)]
        assert read[0] == read[1]


def test_raw_crops_read_the_eval_pages_as_well_as_jpeg(stage, pages):
    """Raw crops read as PNG ones do (both lossless); against JPEG q95 the page CER moved by
    +0.0006, -0.0006 and 0 on three det/rec pairs (2026-12-04): noise of a few characters."""
    raw, jpeg = _page_cer(stage, pages, True, "raw"), _page_cer(stage, pages, True, "jpeg")
    png = _page_cer(stage, pages, True, "png")
    print(f"\nmean page CER, det_v6small_320/rec_v6tiny folded: raw crops {raw:.4f}, PNG {png:.4f}, "
          f"JPEG q95 {jpeg:.4f}")
    assert raw == png and raw == pytest.approx(jpeg, abs=2e-3)
