"""The OIP codec's image limits: the hand-read PNG/JPEG headers agree with Pillow (what the
worker decodes with), decompression bombs and lying headers are refused from the header
without decoding anything, and the pixel bound holds for every input form."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common import oip
from services.common.errors import InvalidInput
from services.gen import inference_pb2 as pb
from services.ocr.processors import decode_image

LIMITS = dict(max_bytes=8 << 20, max_side=4096, max_pixels=12_582_912)
SIG = b"\x89PNG\r\n\x1a\n"


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def ihdr(w: int, h: int, depth: int = 8, color: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))


def bomb_png(w: int, h: int) -> bytes:
    """A complete, valid 1-bit grayscale PNG of w x h zero pixels, built by streaming rows
    through zlib: never more than one row in memory (20,000 x 20,000: about 49 KB of PNG,
    400 MB as Pillow's 8-bit pixels, 1.2 GB once converted to RGB)."""
    row = b"\0" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return SIG + ihdr(w, h, depth=1) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(fmt: str, w: int, h: int, mode: str = "RGB", **kw) -> bytes:
    rng = np.random.default_rng(w * h)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_with_size(w: int, h: int, base: bytes | None = None) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim w x h."""
    data = bytearray(base or encoded("JPEG", 16, 8))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def bytes_request(image: bytes) -> pb.ModelInferRequest:
    return oip.build_image_request("ocr", image)


def uint8_request(shape, raw: bytes | None = None, values=None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="ocr")
    t = req.inputs.add(name="image", datatype="UINT8", shape=list(shape))
    if raw is not None:
        req.raw_input_contents.append(raw)
    if values is not None:
        t.contents.uint_contents.extend(values)
    return req


# --------------------------------------------------------------------------- agreement


def _variety() -> list[tuple[str, bytes]]:
    out = []
    for mode in ("RGB", "L", "P", "RGBA", "LA", "1", "I;16"):
        out.append((f"png {mode}", encoded("PNG", 53, 37, mode)))
    out.append(("png interlaced", encoded("PNG", 31, 17, interlace=1)))
    out.append(("png optimized", encoded("PNG", 31, 17, optimize=True)))
    for mode in ("RGB", "L", "CMYK"):
        out.append((f"jpeg {mode}", encoded("JPEG", 53, 37, mode)))
        out.append((f"jpeg {mode} progressive", encoded("JPEG", 53, 37, mode, progressive=True)))
    out.append(("jpeg exif", encoded("JPEG", 40, 30, exif=Image.Exif().tobytes())))
    frames = [Image.new("RGB", (20, 10), (i * 40, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    out.append(("apng", buf.getvalue()))
    import cv2
    arr = np.random.default_rng(1).integers(0, 255, (29, 41, 3), dtype=np.uint8)
    out.append(("cv2 jpeg", cv2.imencode(".jpg", arr)[1].tobytes()))
    out.append(("cv2 png", cv2.imencode(".png", arr)[1].tobytes()))
    return out


@pytest.mark.parametrize("name, data", _variety(), ids=lambda x: x if isinstance(x, str) else "")
def test_header_size_is_what_pillow_and_the_worker_decode(name, data):
    with Image.open(io.BytesIO(data)) as im:
        assert oip.image_size(data) == im.size
    h, w, _ = decode_image(data).shape          # the worker's decoder
    assert oip.image_size(data) == (w, h)
    assert oip.extract_image(bytes_request(data), **LIMITS) == data


# --------------------------------------------------------------------------- bombs


def test_png_decompression_bomb_is_refused_from_its_header_without_decoding():
    bomb = bomb_png(20_000, 20_000)
    assert len(bomb) < 100_000                               # ~49 KB on the wire
    # and it is a whole PNG: its IDAT inflates to all 20,000 rows (counted in 1 MB steps)
    idat = bomb[8 + 25 + 8:-12 - 4]
    d, inflated, rest = zlib.decompressobj(), 0, idat
    while not d.eof:
        out = d.decompress(rest, 1 << 20)
        assert out or d.eof, "the IDAT stream ends early"
        inflated, rest = inflated + len(out), d.unconsumed_tail
    assert inflated == 20_000 * (1 + 20_000 // 8)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="20000x20000, larger than the limit of 4096"):
            oip.extract_image(bytes_request(bomb), **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(bomb) + 1_000_000, f"extract_image allocated {peak} bytes"


def test_image_within_max_side_but_over_max_pixels_is_refused():
    with pytest.raises(InvalidInput, match=r"4096x4096 = 16777216 pixels, more than the limit of 12582912"):
        oip.extract_image(bytes_request(bomb_png(4096, 4096)), **LIMITS)
    with pytest.raises(InvalidInput, match=r"4000x3200 = 12800000 pixels"):
        oip.extract_image(bytes_request(jpeg_with_size(4000, 3200)), **LIMITS)
    # the same within the limits passes the header check
    assert oip.extract_image(bytes_request(jpeg_with_size(4000, 3000)), **LIMITS)


def test_max_pixels_is_optional():
    big = bomb_png(4096, 4096)
    limits = dict(LIMITS)
    del limits["max_pixels"]
    assert oip.extract_image(bytes_request(big), **limits) == big


def test_jpeg_header_claiming_huge_dimensions_is_refused():
    with pytest.raises(InvalidInput, match="65000x60000, larger than the limit of 4096"):
        oip.extract_image(bytes_request(jpeg_with_size(65000, 60000)), **LIMITS)


# --------------------------------------------------------------------------- lying headers


def test_two_ihdr_chunks_are_refused_because_pillow_would_use_the_second():
    data = SIG + ihdr(10, 10) + ihdr(4096, 4096) + chunk(b"IDAT", zlib.compress(b"\0" * 110)) \
        + chunk(b"IEND", b"")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4096, 4096)   # the header a decoder would believe
    with pytest.raises(InvalidInput, match="more than one IHDR"):
        oip.image_size(data)


def test_two_jpeg_frame_headers_are_refused_because_pillow_would_use_the_second():
    base = encoded("JPEG", 16, 8)
    i = base.index(b"\xff\xc0")
    (length,) = struct.unpack(">H", base[i + 2:i + 4])
    sof = base[i:i + 2 + length]
    liar = bytearray(sof)
    liar[5:9] = struct.pack(">HH", 3000, 4000)
    data = base[:i] + sof + bytes(liar) + base[i + 2 + length:]
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4000, 3000)
    with pytest.raises(InvalidInput, match="more than one frame header"):
        oip.image_size(data)


def _bad_crc() -> bytes:
    data = bytearray(encoded("PNG", 20, 10))
    data[16:20] = struct.pack(">I", 99_999)   # IHDR width changed, CRC not
    return bytes(data)


@pytest.mark.parametrize("data, match", [
    (SIG + b"\0" * 40, "first chunk is not a 13-byte IHDR"),
    (SIG + ihdr(10, 10)[:-6], "runs past the end"),
    (SIG + ihdr(10, 10), "truncated before the image data"),
    (SIG + ihdr(10, 10) + chunk(b"IEND", b""), "no image data"),
    (SIG + ihdr(10, 10, depth=3), "invalid IHDR fields"),
    (SIG + ihdr(10, 10, color=5), "invalid IHDR fields"),
    (_bad_crc(), "IHDR checksum mismatch"),
    (SIG + ihdr(10, 10) + struct.pack(">I", 1 << 31) + b"tEXt", "runs past the end"),
    (SIG + ihdr(10, 10) + chunk(b"IDAT", zlib.compress(b"\0" * 110))[:-5], "image data is truncated"),
    (b"\xff\xd8\xff", "truncated before the image data"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "runs past the end"),
    (b"\xff\xd8\x00\x00", "not a PNG or JPEG"),
    (b"\xff\xd8\xff\xe0\x00\x04ab\x12", "no JPEG marker found"),
    (b"\xff\xd8\xff\xda\x00\x04ab", "no frame header before the image data"),
    (b"\xff\xd8\xff\xd9", "no image data"),
])
def test_malformed_headers_are_refused(data, match):
    with pytest.raises(InvalidInput, match=match):
        oip.extract_image(bytes_request(data), **LIMITS)


def test_a_truncated_image_passes_the_header_check_and_the_worker_refuses_it():
    """What reaches a worker past the header check decodes at the declared size or fails
    cleanly: a cut-off body is InvalidInput at the worker (the front door's INVALID_ARGUMENT)."""
    for data in (encoded("PNG", 300, 200), encoded("JPEG", 300, 200)):
        cut = data[:len(data) // 2]
        assert oip.extract_image(bytes_request(cut), **LIMITS) == cut
        with pytest.raises(InvalidInput, match="not a decodable image"):
            decode_image(cut)


def test_png_with_a_padding_chunk_before_the_data_is_read_through():
    data = encoded("PNG", 30, 20)
    padded = data[:33] + chunk(b"paDd", b"\0" * 100_000) + data[33:]
    assert oip.image_size(padded) == (30, 20)
    assert decode_image(padded).shape == (20, 30, 3)


# --------------------------------------------------------------------------- raw pixels


def test_uint8_limits_are_checked_from_the_shape_before_the_data():
    # no data at all: the shape alone is refused, not "needs N values"
    with pytest.raises(InvalidInput, match=r"shape \[2000, 2000, 3\] = 12000000 bytes exceeds the limit"):
        oip.extract_image(uint8_request([2000, 2000, 3]), **LIMITS)
    with pytest.raises(InvalidInput, match="4097x1, larger than the limit of 4096"):
        oip.extract_image(uint8_request([1, 4097, 3]), **LIMITS)
    with pytest.raises(InvalidInput, match="more than the limit of 100 pixels"):
        oip.extract_image(uint8_request([11, 10, 3]), **dict(LIMITS, max_pixels=100))


def test_uint8_typed_contents_out_of_range_are_refused():
    with pytest.raises(InvalidInput, match="out of range"):
        oip.extract_image(uint8_request([2, 2, 3], values=[0] * 11 + [256]), **LIMITS)
    png = oip.extract_image(uint8_request([2, 2, 3], values=[255] * 12), **LIMITS)
    assert decode_image(png).shape == (2, 2, 3)


def test_uint8_pixels_round_trip_through_the_png():
    pixels = np.random.default_rng(3).integers(0, 255, (17, 23, 3), dtype=np.uint8)
    png = oip.extract_image(uint8_request(pixels.shape, pixels.tobytes()), **LIMITS)
    assert np.array_equal(decode_image(png)[:, :, ::-1], pixels)   # worker gives BGR
