"""The OIP v2 codec: round trips, every InvalidInput case, and interoperability with
tritonclient's own request builder and response reader (no server involved)."""
from __future__ import annotations

import importlib.util
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from services.common import oip
from services.common.errors import InvalidInput
from services.gen import inference_pb2 as pb

LIMITS = dict(max_bytes=1_000_000, max_side=2000)


def _image(w: int = 40, h: int = 20, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 30)).save(buf, format=fmt)
    return buf.getvalue()


PNG = _image()


def _lines() -> list[oip.OcrLine]:
    return [
        oip.OcrLine("hello", (1, 2, 30, 2, 30, 12, 1, 12), 0.5),
        oip.OcrLine("wörld ✓", (0.5, 0.25, 9, 0, 9, 4, 0, 4), 0.875),
        oip.OcrLine("", (0,) * 8, 0.0),
    ]


# --------------------------------------------------------------------------- BYTES codec


def test_bytes_tensor_round_trip_and_layout():
    items = [b"ab", b"", b"\x00\xff" * 3]
    raw = oip.encode_bytes_tensor(items)
    assert raw[:6] == b"\x02\x00\x00\x00ab"  # 4-byte LE length, then the bytes
    assert len(raw) == 3 * 4 + 2 + 0 + 6
    assert oip.decode_bytes_tensor(raw) == items
    assert oip.decode_bytes_tensor(b"") == []


@pytest.mark.parametrize("raw, match", [
    (b"\x01\x00", "trailing"),                      # not even a full length prefix
    (struct.pack("<I", 5) + b"abc", "declares 5 bytes"),
    (struct.pack("<I", 1) + b"a" + b"\x07", "trailing"),
])
def test_decode_bytes_tensor_malformed(raw, match):
    with pytest.raises(InvalidInput, match=match):
        oip.decode_bytes_tensor(raw)


# --------------------------------------------------------------------------- requests


def test_build_image_request_round_trip():
    req = oip.build_image_request("ocr", PNG, request_id="r1", timeout_ms=250)
    assert req.model_name == "ocr" and req.id == "r1"
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [("image", "BYTES", [1])]
    assert oip.request_timeout_ms(req) == 250
    assert oip.extract_image(req, **LIMITS) == PNG
    # Survives the wire.
    again = pb.ModelInferRequest.FromString(req.SerializeToString())
    assert oip.extract_image(again, **LIMITS) == PNG


def test_extract_image_accepts_jpeg_and_bytes_contents():
    jpg = _image(fmt="JPEG")
    req = pb.ModelInferRequest(model_name="ocr")
    t = req.inputs.add(name="image", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(jpg)
    assert oip.extract_image(req, **LIMITS) == jpg


def test_extract_image_uint8_pixels_become_png():
    pixels = np.zeros((6, 5, 3), np.uint8)
    pixels[..., 0] = 255  # pure red, RGB
    req = pb.ModelInferRequest(model_name="ocr")
    req.inputs.add(name="image", datatype="UINT8", shape=[6, 5, 3])
    req.raw_input_contents.append(pixels.tobytes())
    png = oip.extract_image(req, **LIMITS)
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (5, 6)
        assert im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_extract_image_uint8_in_typed_contents():
    req = pb.ModelInferRequest(model_name="ocr")
    t = req.inputs.add(name="image", datatype="UINT8", shape=[2, 2, 3])
    t.contents.uint_contents.extend([7] * 12)
    assert oip.extract_image(req, **LIMITS).startswith(b"\x89PNG")


def _req(datatype="BYTES", shape=(1,), raw: bytes | None = None, name="image"):
    req = pb.ModelInferRequest(model_name="ocr")
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


def _bytes_req(image: bytes):
    return _req(raw=oip.encode_bytes_tensor([image]))


def _two_inputs():
    req = _bytes_req(PNG)
    req.inputs.add(name="extra", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(oip.encode_bytes_tensor([PNG]))
    return req


def _both_raw_and_contents():
    req = _bytes_req(PNG)
    req.inputs[0].contents.bytes_contents.append(PNG)
    return req


def _corrupt_png():
    return PNG[:8] + b"\x00" * 40  # right magic, garbage header


@pytest.mark.parametrize("make, match", [
    (lambda: pb.ModelInferRequest(model_name="ocr"), "no inputs"),
    (_two_inputs, "expected exactly one input"),
    (lambda: _req(name="img", raw=oip.encode_bytes_tensor([PNG])), "unknown input 'img'"),
    (lambda: _req(datatype="FP32", raw=b"\x00" * 4), "datatype 'FP32' not supported"),
    (lambda: _req(shape=(2,), raw=oip.encode_bytes_tensor([PNG, PNG])), r"shape \[1\]"),
    (lambda: _req(shape=(1, 1), raw=oip.encode_bytes_tensor([PNG])), r"shape \[1\]"),
    (lambda: _req(raw=oip.encode_bytes_tensor([PNG, PNG])), "holds 2 elements"),
    (lambda: _req(raw=oip.encode_bytes_tensor([PNG])[:-3]), "malformed BYTES"),
    (lambda: _req(), "holds 0 elements"),
    (_both_raw_and_contents, "both in contents and raw"),
    (lambda: _bytes_req(b""), "empty image"),
    (lambda: _bytes_req(b"GIF89a" + b"\x00" * 20), "not a PNG or JPEG"),
    (lambda: _bytes_req(_corrupt_png()), "cannot read the image header"),
    (lambda: _bytes_req(_image(2001, 10)), r"2001x10, larger than the limit of 2000"),
    (lambda: _bytes_req(PNG + b"\x00" * 1_000_000), "exceeds the limit of 1000000 bytes"),
    (lambda: _req("UINT8", (4, 4), b"\x00" * 16), r"shape \[H, W, 3\]"),
    (lambda: _req("UINT8", (4, 4, 1), b"\x00" * 16), r"shape \[H, W, 3\]"),
    (lambda: _req("UINT8", (4, -4, 3), b"\x00" * 48), "negative dimension"),
    (lambda: _req("UINT8", (0, 4, 3), b""), "empty image"),
    (lambda: _req("UINT8", (4, 4, 3), b"\x00" * 47), r"3\] x 1 byte = 48 bytes, but 47 bytes were sent"),
    (lambda: _req("UINT8", (4, 4, 3)), "needs 48 values"),
    (lambda: _req("UINT8", (10, 2001, 3), b"\x00" * 60030), "2001x10, larger than"),
])
def test_extract_image_rejects(make, match):
    with pytest.raises(InvalidInput, match=match):
        oip.extract_image(make(), **LIMITS)


def test_uint8_payload_over_max_bytes():
    req = _req("UINT8", (10, 10, 3), b"\x01" * 300)
    with pytest.raises(InvalidInput, match="300 bytes exceeds the limit of 299"):
        oip.extract_image(req, max_bytes=299, max_side=100)


def test_request_timeout_ms():
    req = pb.ModelInferRequest()
    assert oip.request_timeout_ms(req) is None
    req.parameters["timeout"].int64_param = 1500
    assert oip.request_timeout_ms(req) == 1500
    req.parameters["timeout"].string_param = " 42 "
    assert oip.request_timeout_ms(req) == 42


@pytest.mark.parametrize("field, value, match", [
    ("int64_param", 0, "must be positive"),
    ("int64_param", -5, "must be positive"),
    ("string_param", "soon", "not an integer"),
    ("string_param", "-1", "must be positive"),
    ("bool_param", True, "must be an int64"),
])
def test_request_timeout_ms_rejects(field, value, match):
    req = pb.ModelInferRequest()
    setattr(req.parameters["timeout"], field, value)
    with pytest.raises(InvalidInput, match=match):
        oip.request_timeout_ms(req)


def test_request_timeout_ms_rejects_unset_parameter():
    req = pb.ModelInferRequest()
    req.parameters["timeout"].SetInParent()  # key present, no value chosen
    with pytest.raises(InvalidInput, match="got nothing"):
        oip.request_timeout_ms(req)


# --------------------------------------------------------------------------- responses


def test_ocr_response_round_trip_raw():
    lines = _lines()
    resp = oip.build_ocr_response("ocr", "r7", lines, {"plan_version": 3, "variant_path": "a/b",
                                                        "degraded": False})
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("text", "BYTES", [3]), ("boxes", "FP32", [3, 8]), ("confidence", "FP32", [3])]
    assert len(resp.raw_output_contents) == 3
    assert len(resp.raw_output_contents[1]) == 3 * 8 * 4
    assert oip.read_parameters(resp.parameters) == {
        "plan_version": 3, "variant_path": "a/b", "degraded": False}
    wire = pb.ModelInferResponse.FromString(resp.SerializeToString())
    assert oip.parse_ocr_response(wire) == lines  # values chosen exact in float32


def test_ocr_response_empty():
    resp = oip.build_ocr_response("ocr", "", [], {})
    assert [list(o.shape) for o in resp.outputs] == [[0], [0, 8], [0]]
    assert oip.parse_ocr_response(resp) == []


def test_parse_ocr_response_typed_contents():
    lines = _lines()
    resp = pb.ModelInferResponse(model_name="ocr")
    t = resp.outputs.add(name="text", datatype="BYTES", shape=[3])
    t.contents.bytes_contents.extend(ln.text.encode() for ln in lines)
    # Output order is not significant.
    c = resp.outputs.add(name="confidence", datatype="FP32", shape=[3])
    c.contents.fp32_contents.extend(ln.confidence for ln in lines)
    b = resp.outputs.add(name="boxes", datatype="FP32", shape=[3, 8])
    b.contents.fp32_contents.extend(p for ln in lines for p in ln.points)
    assert oip.parse_ocr_response(resp) == lines


def test_parse_ocr_response_rejects_malformed():
    resp = oip.build_ocr_response("ocr", "", _lines())
    del resp.outputs[2]
    with pytest.raises(InvalidInput, match="outputs but 3 raw"):
        oip.parse_ocr_response(resp)
    resp = oip.build_ocr_response("ocr", "", _lines())
    resp.raw_output_contents[1] = resp.raw_output_contents[1][:-4]
    with pytest.raises(InvalidInput, match="expected 24 x 4"):
        oip.parse_ocr_response(resp)
    resp = oip.build_ocr_response("ocr", "", _lines())
    resp.outputs[0].name = "txt"
    with pytest.raises(InvalidInput, match="no output 'text'"):
        oip.parse_ocr_response(resp)


def test_ocr_line_validates_points():
    with pytest.raises(ValueError, match="8 numbers"):
        oip.OcrLine("x", (1, 2, 3), 1.0)
    assert oip.OcrLine("x", [1] * 8, 1).points == (1.0,) * 8


def test_model_metadata():
    md = oip.model_metadata("ocr", versions=["1"])
    assert md.name == "ocr" and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("image", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
        ("text", "BYTES", [-1]), ("boxes", "FP32", [-1, 8]), ("confidence", "FP32", [-1])]


# --------------------------------------------------------------------------- tritonclient
#
# tritonclient's service_pb2 and our inference_pb2 both declare the protobuf package
# `inference` (they must: it names the gRPC service on the wire), so the two cannot be
# loaded into one process's descriptor pool ("duplicate symbol"). The tritonclient side
# therefore runs in a child Python process; only serialised bytes cross over, exactly as
# they would over gRPC.

_TRITON_REQUEST = """
import sys, numpy as np, tritonclient.grpc as tc
from tritonclient.grpc import _utils
png = sys.stdin.buffer.read()
inp = tc.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([png], dtype=object))
req = _utils._get_inference_request(
    model_name="ocr", inputs=[inp], model_version="", request_id="t-1",
    outputs=[tc.InferRequestedOutput("text")], sequence_id=0, sequence_start=False,
    sequence_end=False, priority=0, timeout=900, parameters={"tenant": "a"})
sys.stdout.buffer.write(req.SerializeToString())
"""

_TRITON_RESULT = """
import json, sys, tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
resp = service_pb2.ModelInferResponse.FromString(sys.stdin.buffer.read())
r = tc.InferResult(resp)
p = r.get_response().parameters
print(json.dumps({
    "text": [t.decode() for t in r.as_numpy("text")],
    "boxes": r.as_numpy("boxes").tolist(), "boxes_dtype": str(r.as_numpy("boxes").dtype),
    "confidence": r.as_numpy("confidence").tolist(),
    "plan_version": p["plan_version"].int64_param,
    "variant_path": p["variant_path"].string_param,
}))
"""


def _run_triton(script: str, stdin: bytes) -> bytes:
    # never import tritonclient here (see above); it is a dev dependency, so a missing one fails
    assert importlib.util.find_spec("tritonclient") is not None, \
        "tritonclient is not installed (pip install -e '.[dev]')"
    done = subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_tritonclient_request_is_accepted():
    """tritonclient.grpc builds the request -> bytes on the wire -> our extract_image."""
    ours = pb.ModelInferRequest.FromString(_run_triton(_TRITON_REQUEST, PNG))
    assert ours.model_name == "ocr" and ours.id == "t-1"
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [("image", "BYTES", [1])]
    assert oip.extract_image(ours, **LIMITS) == PNG
    assert oip.request_timeout_ms(ours) == 900
    assert oip.read_parameters(ours.parameters) == {"timeout": 900, "tenant": "a"}


def test_tritonclient_reads_our_response():
    """our build_ocr_response -> bytes on the wire -> tritonclient.grpc.InferResult."""
    lines = _lines()
    ours = oip.build_ocr_response("ocr", "r1", lines, {"plan_version": 9, "variant_path": "p"})
    got = json.loads(_run_triton(_TRITON_RESULT, ours.SerializeToString()))
    assert got["text"] == [ln.text for ln in lines]
    assert got["boxes_dtype"] == "float32"
    assert got["boxes"] == [list(ln.points) for ln in lines]  # shape [3, 8]
    assert got["confidence"] == [0.5, 0.875, 0.0]
    assert (got["plan_version"], got["variant_path"]) == (9, "p")
