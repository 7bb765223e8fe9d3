"""Processors without models: invalid payloads, preprocessing geometry, fake sessions."""
import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.processing import make_processor
from services.common.spec import ShapeBuckets, VariantSpec
from services.ocr.processors import DetProcessor, RecProcessor, decode_image, fit_page, page_buckets

OFF = ShapeBuckets.none()   # the fixtures below pad as before shape buckets (each batch to its largest item)


def _png(w=200, h=100, color=(255, 255, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def det(tmp_path):
    return make_processor(VariantSpec("d", "det", "det.onnx", "ppocr_det", settings={"side": 320}, buckets=OFF),
                          tmp_path, ["services.ocr.processors"])


@pytest.fixture
def rec(tmp_path):
    (tmp_path / "dict.txt").write_text("a\nb\n")
    return make_processor(VariantSpec("r", "rec", "rec.onnx", "ppocr_rec", settings={"dict": "dict.txt"},
                                      buckets=OFF), tmp_path, ["services.ocr.processors"])


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
        crop = decode_image(r.child_payloads[0])
        assert crop.shape[1] > crop.shape[0]


def test_det_sends_raw_crops_unless_told_otherwise(det, tmp_path):
    item = det.prepare(_png(640, 320))
    raw = det.run_batch(FakeDetSession((50, 40, 150, 60)), [item])[0].child_payloads[0]
    assert raw[:4] == b"PSRT"
    jpeg_det = make_processor(VariantSpec("d", "det", "det.onnx", "ppocr_det",
                                          settings={"side": 320, "crop_format": "jpeg"}, buckets=OFF),
                              tmp_path, ["services.ocr.processors"])
    jpeg = jpeg_det.run_batch(FakeDetSession((50, 40, 150, 60)), [jpeg_det.prepare(_png(640, 320))])[0]
    assert jpeg.child_payloads[0][:2] == b"\xff\xd8"
    assert decode_image(raw).shape == decode_image(jpeg.child_payloads[0]).shape


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


# -- shape buckets ----------------------------------------------------------------------

@pytest.fixture
def det_b(tmp_path):
    """The default buckets of ppocr_det: 1:1, 4:3, 3:4 at side 320."""
    return make_processor(VariantSpec("d", "det", "det.onnx", "ppocr_det", settings={"side": 320}), tmp_path,
                          ["services.ocr.processors"])


@pytest.fixture
def rec_b(tmp_path):
    """The default buckets of ppocr_rec: widths 80, 160, 320, 640."""
    (tmp_path / "dict.txt").write_text("a\nb\n")
    return make_processor(VariantSpec("r", "rec", "rec.onnx", "ppocr_rec", settings={"dict": "dict.txt"}), tmp_path,
                          ["services.ocr.processors"])


class ShapeRecordingRecSession(FakeRecSession):
    """Reads "a" for a crop that starts white, "b" for one that starts black; records shapes."""

    def __init__(self):
        super().__init__(4)
        self.shapes = []

    def run(self, outputs, feeds):
        x = feeds["x"]
        self.shapes.append(x.shape)
        probs = np.zeros((x.shape[0], 2, 4), np.float32)
        for i in range(x.shape[0]):
            probs[i, 0, 1 if x[i, 0, 0, 0] > 0 else 2] = 1.0
            probs[i, 1, 0] = 1.0
        return [probs]


def test_page_buckets_round_the_short_side_up_to_32():
    assert page_buckets(320, ((1, 1), (4, 3), (3, 4))) == ((320, 320), (256, 320), (320, 256))   # 240 -> 256
    assert page_buckets(640, ((1, 1), (4, 3), (3, 4), (2, 1))) == ((640, 640), (480, 640), (640, 480), (320, 640))
    assert page_buckets(320, ((1, 1), (1, 1))) == ((320, 320),)


def test_a_page_goes_to_the_bucket_that_keeps_it_largest_then_the_smallest():
    buckets = page_buckets(320, ((1, 1), (4, 3), (3, 4)))
    assert fit_page(320, 640, 320, buckets) == ((256, 320), 0.5)     # 160 x 320: fits 4:3, not only 1:1
    assert fit_page(640, 320, 320, buckets) == ((320, 256), 0.5)     # portrait
    assert fit_page(500, 500, 320, buckets) == ((320, 320), 0.64)    # square: only 1:1 keeps it at 320
    # letterboxed: without a square bucket a square page shrinks to fit 4:3
    assert fit_page(400, 400, 320, page_buckets(320, ((4, 3), (3, 4)))) == ((256, 320), 0.64)


def test_det_prepare_pads_to_its_bucket(det_b):
    prep = det_b.prepare(_png(640, 320))
    assert prep.bucket == (256, 320) and prep.data.shape == (3, 256, 320)
    assert prep.meta["scale"] == 0.5 and prep.meta["valid"] == (160, 320)
    assert np.all(prep.data[:, 160:, :] == 0)       # padding is the mean colour
    assert det_b.prepare(_png(300, 600)).bucket == (320, 256)


class ShapeRecordingDetSession(FakeDetSession):
    def __init__(self, rect):
        super().__init__(rect)
        self.shapes = []

    def run(self, outputs, feeds):
        self.shapes.append(feeds["x"].shape)
        return super().run(outputs, feeds)


def test_det_runs_one_model_call_per_bucket_and_keeps_order(det_b):
    items = [det_b.prepare(_png(*wh)) for wh in ((640, 320), (320, 640), (640, 320))]
    sess = ShapeRecordingDetSession((50, 40, 150, 60))
    results = det_b.run_batch(sess, items)
    assert sess.shapes == [(2, 3, 256, 320), (1, 3, 320, 256)]
    # item 1 is portrait (scale 0.5 too): its box maps to the same page coordinates
    assert [len(r.regions) for r in results] == [1, 1, 1]
    assert results[0].regions[0].points == results[2].regions[0].points


def test_rec_pads_each_crop_to_its_width_bucket_and_squeezes_wider_ones(rec_b):
    items = [rec_b.prepare(_png(w, 48)) for w in (100, 900, 50, 320)]
    assert [it.bucket for it in items] == [160, 640, 80, 320]
    assert [it.data.shape for it in items] == [(3, 48, 160), (3, 48, 640), (3, 48, 80), (3, 48, 320)]
    assert [it.meta["width"] for it in items] == [100, 640, 50, 320]      # 900 squeezed to the last bucket
    assert np.all(items[0].data[:, :, 100:] == 0.0) and np.all(items[0].data[:, :, :100] == 1.0)   # white, padded


def test_rec_runs_one_model_call_per_bucket_and_keeps_order(rec_b):
    white, black = (255, 255, 255), (0, 0, 0)
    items = [rec_b.prepare(_png(w, 48, c)) for w, c in ((100, white), (900, black), (120, black), (50, white))]
    sess = ShapeRecordingRecSession()
    out = rec_b.run_batch(sess, items)
    assert sess.shapes == [(2, 3, 48, 160), (1, 3, 48, 640), (1, 3, 48, 80)]
    assert [r.regions[0].text for r in out] == ["a", "b", "b", "a"]


def test_warmup_items_are_one_per_bucket(det_b, rec_b):
    assert [it.bucket for it in det_b.warmup_items()] == list(det_b.shape_buckets()) == [
        (320, 320), (256, 320), (320, 256)]
    assert [it.bucket for it in rec_b.warmup_items()] == list(rec_b.shape_buckets()) == [80, 160, 320, 640]


def test_buckets_off_keep_one_square_page_shape(det):
    assert det.shape_buckets() == ((320, 320),)
    assert det.prepare(_png(640, 320)).bucket == (320, 320)


def test_a_processor_refuses_the_other_kind_of_buckets(tmp_path):
    (tmp_path / "dict.txt").write_text("a\n")
    with pytest.raises(ValueError, match="takes buckets.aspects"):
        make_processor(VariantSpec("d", "det", "m", "ppocr_det", buckets=ShapeBuckets(widths=(320,))), tmp_path,
                       ["services.ocr.processors"])
    with pytest.raises(ValueError, match="takes buckets.widths"):
        make_processor(VariantSpec("r", "rec", "m", "ppocr_rec", settings={"dict": "dict.txt"},
                                   buckets=ShapeBuckets(aspects=((1, 1),))), tmp_path, ["services.ocr.processors"])
