"""Crop payloads: the raw tensor format (strict validation) beside PNG/JPEG."""
import struct

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.common.processing import make_processor
from services.common.spec import VariantSpec
from services.ocr.images import RAW_HEADER, decode_image, decode_raw, encode_image, encode_raw


def _crop(h=20, w=50):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_raw_payload_round_trips_exactly_with_a_16_byte_header():
    crop = _crop()
    payload = encode_image(crop, "raw")
    assert len(payload) == 16 + 20 * 50 * 3
    out = decode_image(payload)
    assert out.dtype == np.uint8 and np.array_equal(out, crop)


def test_png_and_jpeg_payloads_still_decode():
    crop = _crop()
    assert np.array_equal(decode_image(encode_image(crop, "png")), crop)
    assert decode_image(encode_image(crop, "jpeg")).shape == crop.shape


def _header(magic=b"PSRT", version=1, dtype=1, channels=3, h=2, w=3):
    return RAW_HEADER.pack(magic, version, dtype, channels, h, w)


@pytest.mark.parametrize("payload,match", [
    (b"PSRT" + b"\0" * 5, "shorter than its 16-byte header"),
    (_header(version=2) + b"\0" * 18, "version 2"),
    (_header(dtype=2) + b"\0" * 18, "uint8 with 3 channels"),
    (_header(channels=1) + b"\0" * 6, "uint8 with 3 channels"),
    (_header(h=0) + b"", "each side must be 1..8192"),
    (_header(w=9000) + b"\0" * 10, "each side must be 1..8192"),
    (_header() + b"\0" * 17, "needs 18 bytes of pixels, got 17"),
    (_header() + b"\0" * 19, "needs 18 bytes of pixels, got 19"),
    (_header(h=0xFFFFFFFF, w=0xFFFFFFFF) + b"\0" * 18, "each side must be"),
])
def test_bad_raw_payloads_raise_invalid_input_naming_the_problem(payload, match):
    with pytest.raises(InvalidInput, match=match):
        decode_image(payload)


def test_raw_payload_over_max_side_is_refused_from_the_header():
    with pytest.raises(InvalidInput, match="each side must be 1..40"):
        decode_raw(encode_raw(_crop(20, 50)), max_side=40)


def test_bad_magic_is_refused_by_decode_raw_and_left_to_pillow_by_decode_image():
    payload = struct.pack("<4sBBHII", b"PSRX", 1, 1, 3, 2, 3) + b"\0" * 18
    with pytest.raises(InvalidInput, match="bad magic"):
        decode_raw(payload)
    with pytest.raises(InvalidInput, match="not a decodable image"):
        decode_image(payload)


def test_encode_raw_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        encode_raw(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        encode_raw(np.zeros((4, 4, 3), np.float32))


def test_line_models_accept_raw_crops(tmp_path):
    (tmp_path / "dict.txt").write_text("a\nb\n")
    rec = make_processor(VariantSpec("r", "rec", "rec.onnx", "ppocr_rec", settings={"dict": "dict.txt"}),
                         tmp_path, ["services.ocr.processors"])
    cls = make_processor(VariantSpec("c", "cls", "cls.onnx", "ppocr_cls"), tmp_path, ["services.ocr.processors"])
    crop = _crop(24, 96)
    for proc in (rec, cls):
        assert np.array_equal(proc.prepare(encode_raw(crop)).data, proc.prepare(encode_image(crop, "png")).data)


def test_det_refuses_an_unknown_crop_format(tmp_path):
    with pytest.raises(ValueError, match="crop_format must be one of jpeg, png, raw"):
        make_processor(VariantSpec("d", "det", "det.onnx", "ppocr_det", settings={"crop_format": "webp"}),
                       tmp_path, ["services.ocr.processors"])


def _png_of(mode, seed=0, transparency=False):
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    img = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").quantize(64)
    buf = io.BytesIO()
    # a tRNS chunk: one palette index, or one RGB colour
    img.save(buf, "PNG", **({"transparency": 3 if mode == "P" else (10, 20, 30)} if transparency else {}))
    return buf.getvalue()


@pytest.mark.parametrize("mode,transparency", [("RGB", False), ("RGBA", False), ("L", False), ("LA", False),
                                               ("P", False), ("P", True), ("RGB", True)])
def test_png_decoded_by_opencv_gives_pillows_pixels(mode, transparency):
    payload = _png_of(mode, transparency=transparency)
    fast, pil = decode_image(payload), decode_image(payload, fast_png=False)
    assert fast.shape == pil.shape == (37, 53, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, pil)


@pytest.mark.parametrize("cut", [60, 200, -20, -13, -12])   # -12: no IEND chunk, which Pillow let pass
def test_truncated_png_is_refused_by_the_fast_path(cut):
    payload = _png_of("RGB")
    with pytest.raises(InvalidInput, match="not a decodable image"):
        decode_image(payload[:cut])


def test_pngs_opencv_is_not_given_stay_with_pillow():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(buf, "PNG")   # 16-bit grey: Pillow's I;16
    img = decode_image(buf.getvalue())
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    assert np.array_equal(img, decode_image(buf.getvalue(), fast_png=False))
