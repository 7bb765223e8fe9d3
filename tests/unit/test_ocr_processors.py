"""Processors without models: invalid payloads, preprocessing geometry, fake sessions."""
import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.processing import make_processor
from services.common.spec import VariantSpec
from services.ocr.processors import DetProcessor, RecProcessor, decode_image


def _png(w=200, h=100, color=(255, 255, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def det(tmp_path):
    return make_processor(VariantSpec("d", "det", "det.onnx", "ppocr_det", settings={"side": 320}), tmp_path,
                          ["services.ocr.processors"])


@pytest.fixture
def rec(tmp_path):
    (tmp_path / "dict.txt").write_text("a\nb\n")
    return make_processor(VariantSpec("r", "rec", "rec.onnx", "ppocr_rec", settings={"dict": "dict.txt"}), tmp_path,
                          ["services.ocr.processors"])


@pytest.mark.parametrize("payload", [b"", b"not an image", _png()[:60]])
def test_invalid_payloads_raise_invalid_input(det, rec, payload):
    with pytest.raises(InvalidInput):
        det.prepare(payload)
    with pytest.raises(InvalidInput):
        rec.prepare(payload)


def test_oversized_image_is_rejected_from_the_header():
    with pytest.raises(InvalidInput, match="larger than"):
        decode_image(_png(300, 10), max_side=256)


def test_decode_returns_bgr(det):
    img = decode_image(_png(color=(255, 0, 0)))     # pure red in RGB
    assert img[0, 0].tolist() == [0, 0, 255]


def test_det_prepare_resizes_long_side_and_pads(det):
    assert isinstance(det, DetProcessor)
    prep = det.prepare(_png(640, 320))
    assert prep.data.shape == (3, 320, 320)
    assert prep.meta["scale"] == 0.5 and prep.meta["valid"] == (160, 320)
    assert np.all(prep.data[:, 160:, :] == 0)       # padding is the mean colour


class FakeDetSession:
    """Returns a probability map with one text rectangle per page, at a fixed place."""

    def __init__(self, rect):
        self.rect = rect

    def get_inputs(self):
        return [type("I", (), {"name": "x"})()]

    def run(self, outputs, feeds):
        x = feeds["x"]
        out = np.zeros((x.shape[0], 1, x.shape[2], x.shape[3]), np.float32)
        x0, y0, x1, y1 = self.rect
        out[:, 0, y0:y1, x0:x1] = 0.95
        return [out]


def test_det_maps_boxes_back_to_page_coordinates_and_crops(det):
    items = [det.prepare(_png(640, 320)) for _ in range(2)]
    results = det.run_batch(FakeDetSession((50, 40, 150, 60)), items)
    assert len(results) == 2
    for r in results:
        assert len(r.regions) == len(r.child_payloads) == 1
        xs, ys = r.regions[0].points[0::2], r.regions[0].points[1::2]
        # map box 50..150 x 40..60 (plus unclip), scale 0.5 -> page 100..300 x 80..120
        assert min(xs) < 100 < 300 < max(xs) and min(ys) < 80 < 120 < max(ys)
        crop = Image.open(io.BytesIO(r.child_payloads[0]))
        assert crop.width > crop.height


class FakeRecSession:
    def __init__(self, n_classes, drop_one=False):
        self.n, self.drop_one = n_classes, drop_one
        self.widths = []

    def get_inputs(self):
        return [type("I", (), {"name": "x"})()]

    def run(self, outputs, feeds):
        x = feeds["x"]
        self.widths.append(x.shape[3])
        steps = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]   # item i's arg-max class per step
        probs = np.zeros((x.shape[0], 4, self.n), np.float32)
        for i in range(x.shape[0]):
            probs[i, np.arange(4), steps[i % 3]] = 1.0
        return [probs[:-1] if self.drop_one else probs]


def test_rec_batches_pad_to_max_width_and_keep_order(rec):
    assert isinstance(rec, RecProcessor) and len(rec.charset) == 4   # blank, a, b, space
    items = [rec.prepare(_png(w, 48)) for w in (100, 900, 50)]
    assert [it.data.shape[2] for it in items] == [100, 900, 50]
    sess = FakeRecSession(4)
    out = rec.run_batch(sess, items)
    assert sess.widths == [900]
    assert [r.regions[0].text for r in out] == ["a", "a", "aa"]


def test_rec_checks_output_count_and_classes(rec):
    items = [rec.prepare(_png(60, 48)) for _ in range(2)]
    with pytest.raises(RuntimeError, match="2 crops"):
        rec.run_batch(FakeRecSession(4, drop_one=True), items)
    with pytest.raises(RuntimeError, match="classes"):
        rec.run_batch(FakeRecSession(9), items)
