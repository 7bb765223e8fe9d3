"""Open Inference Protocol v2 codec: the tensors the OCR front door speaks.

Pure functions over the generated ``services.gen.inference_pb2`` messages, shared by
the front-door router, the load generator and the tests. Nothing here touches gRPC.

Request: one input ``image``, either

* datatype ``BYTES``, shape ``[1]``: one encoded PNG/JPEG, in ``raw_input_contents``
  (Triton's raw BYTES layout: 4-byte little-endian length, then the bytes) or in
  ``contents.bytes_contents``; or
* datatype ``UINT8``, shape ``[H, W, 3]``: raw row-major pixels, re-encoded to PNG here.

Encoded images are checked from their header only (PNG: the IHDR chunk and the chunk
layout up to the first IDAT; JPEG: the markers up to the first scan), parsed here by hand:
nothing is decompressed, so a decompression bomb (a 20,000 x 20,000 PNG of ~50 KB) is
refused from its declared size before any decoder runs. The worker decodes with Pillow,
which reads the same header fields, so the size checked here is the size it decodes.

Optional request parameter ``timeout`` (int64, or a decimal string): the client's
timeout in **milliseconds** (note: Triton itself reads this parameter as microseconds;
pipeserve uses milliseconds throughout).

Optional request parameter ``timing`` (bool, or the string "true"/"false"): when true,
the response carries parameter ``timing``, a JSON string with the request's latency
breakdown as the front door saw it (``services.router.stats.breakdown``: ``total_ms``,
``phases_ms``, ``unaccounted_ms``, ``stages``; docs/metrics.md, "Latency breakdown").

Response: outputs ``text`` (BYTES ``[N]``), ``boxes`` (FP32 ``[N, 8]``: x1,y1..x4,y4 in
page pixels) and ``confidence`` (FP32 ``[N]``), all in ``raw_output_contents``; response
parameters carry serving metadata (e.g. ``plan_version``, ``variant_path``). A pipeline
with a line orientation classifier (``pipelines/ocr_tree.yaml``) adds ``orientation``
(BYTES ``[N]``: "0" or "180" degrees) and ``orientation_confidence`` (FP32 ``[N]``)
(:data:`ORIENTATION_OUTPUTS`; ``orientation=True`` in the functions below). A request that
names outputs (``ModelInferRequest.outputs``) gets those only, in its order
(:func:`requested_outputs`).

The model's configuration in Triton's form (``ModelConfig``, for perf_analyzer and Triton
clients) is :func:`model_config`, derived from :func:`model_metadata`.

Malformed client data raises :class:`services.common.errors.InvalidInput` with a message
meant for the client.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from services.common.errors import InvalidInput
from services.gen import inference_pb2 as pb
from services.gen import model_config_pb2 as mc

IMAGE_INPUT = "image"
TEXT_OUTPUT = "text"
BOXES_OUTPUT = "boxes"
CONFIDENCE_OUTPUT = "confidence"
OUTPUTS = (TEXT_OUTPUT, BOXES_OUTPUT, CONFIDENCE_OUTPUT)
ORIENTATION_OUTPUT = "orientation"
ORIENTATION_CONFIDENCE_OUTPUT = "orientation_confidence"
ORIENTATION_OUTPUTS = (ORIENTATION_OUTPUT, ORIENTATION_CONFIDENCE_OUTPUT)


def ocr_outputs(orientation: bool = False) -> tuple[str, ...]:
    """The outputs of an OCR pipeline, in answer order (with the orientation child's too)."""
    return OUTPUTS + ORIENTATION_OUTPUTS if orientation else OUTPUTS
TIMEOUT_PARAM = "timeout"
TIMING_PARAM = "timing"   # request: ask for the latency breakdown; response: it, as JSON

_LEN = struct.Struct("<I")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


# --------------------------------------------------------------------------- BYTES


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    """Triton raw BYTES layout: for each element a uint32 LE length, then the bytes."""
    out = bytearray()
    for item in items:
        item = bytes(item)
        out += _LEN.pack(len(item))
        out += item
    return bytes(out)


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Inverse of :func:`encode_bytes_tensor`; InvalidInput on truncated data."""
    items: list[bytes] = []
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        if pos + _LEN.size > len(view):
            raise InvalidInput(
                f"malformed BYTES tensor: {len(view) - pos} trailing byte(s) at offset {pos} "
                "cannot hold a 4-byte length prefix")
        (n,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if pos + n > len(view):
            raise InvalidInput(
                f"malformed BYTES tensor: element {len(items)} declares {n} bytes "
                f"but only {len(view) - pos} remain")
        items.append(bytes(view[pos:pos + n]))
        pos += n
    return items


# --------------------------------------------------------------------------- requests


def build_image_request(model_name: str, image: bytes, request_id: str = "",
                        timeout_ms: int | None = None, timing: bool = False) -> pb.ModelInferRequest:
    """A request carrying one encoded image as ``image`` (BYTES, shape [1]); ``timing``
    asks for the latency breakdown in the response (parameter ``timing``)."""
    req = pb.ModelInferRequest(model_name=model_name, id=request_id)
    tensor = req.inputs.add()
    tensor.name = IMAGE_INPUT
    tensor.datatype = "BYTES"
    tensor.shape.append(1)
    req.raw_input_contents.append(encode_bytes_tensor([image]))
    if timeout_ms is not None:
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        req.parameters[TIMEOUT_PARAM].int64_param = int(timeout_ms)
    if timing:
        req.parameters[TIMING_PARAM].bool_param = True
    return req


def extract_image(request: pb.ModelInferRequest, *, max_bytes: int, max_side: int,
                  max_pixels: int | None = None) -> bytes:
    """Validate the request's ``image`` input and return it as an encoded PNG/JPEG.

    Encoded images are only checked (magic bytes, size, header dimensions), never
    decoded: the detector worker decodes them. ``max_bytes`` bounds the received payload
    in either form; ``max_side`` bounds the image's width and height and ``max_pixels``
    (optional) their product, so what the worker decodes is bounded too.

    CPU cost: a copy of the payload for BYTES inputs; a PNG encode for UINT8 inputs
    (tens of ms for a page): callers on an event loop run this in a thread.
    """
    if len(request.inputs) == 0:
        raise InvalidInput(f"request has no inputs; expected one input '{IMAGE_INPUT}'")
    if len(request.inputs) != 1:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise InvalidInput(
            f"request has {len(request.inputs)} inputs ({names}); expected exactly one "
            f"input '{IMAGE_INPUT}'")
    tensor = request.inputs[0]
    if tensor.name != IMAGE_INPUT:
        raise InvalidInput(f"unknown input '{tensor.name}'; expected '{IMAGE_INPUT}'")
    n_raw = len(request.raw_input_contents)
    if n_raw not in (0, 1):
        raise InvalidInput(
            f"raw_input_contents has {n_raw} entries for 1 input")
    raw = request.raw_input_contents[0] if n_raw else None
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{IMAGE_INPUT}': negative dimension in shape {shape}")

    if tensor.datatype == "BYTES":
        if shape != [1]:
            raise InvalidInput(
                f"input '{IMAGE_INPUT}': BYTES tensor must have shape [1], got {shape}")
        if raw is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{IMAGE_INPUT}': data given both in contents and raw_input_contents")
            if len(raw) > max_bytes + _LEN.size:
                raise InvalidInput(
                    f"input '{IMAGE_INPUT}': {len(raw) - _LEN.size} bytes exceeds the limit "
                    f"of {max_bytes} bytes")
            elements = decode_bytes_tensor(raw)
        else:
            elements = list(tensor.contents.bytes_contents)
        if len(elements) != 1:
            raise InvalidInput(
                f"input '{IMAGE_INPUT}': shape [1] but the data holds {len(elements)} elements")
        image = elements[0]
        _check_encoded_image(image, max_bytes=max_bytes, max_side=max_side, max_pixels=max_pixels)
        return image

    if tensor.datatype == "UINT8":
        if len(shape) != 3 or shape[2] != 3:
            raise InvalidInput(
                f"input '{IMAGE_INPUT}': UINT8 tensor must have shape [H, W, 3], got {shape}")
        h, w, _ = shape
        if h == 0 or w == 0:
            raise InvalidInput(f"input '{IMAGE_INPUT}': empty image, shape {shape}")
        _check_size(w, h, max_side=max_side, max_pixels=max_pixels)
        expected = h * w * 3
        if expected > max_bytes:   # from the shape alone, before touching the data
            raise InvalidInput(
                f"input '{IMAGE_INPUT}': shape {shape} = {expected} bytes exceeds the limit of "
                f"{max_bytes} bytes")
        if raw is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{IMAGE_INPUT}': data given both in contents and raw_input_contents")
            data = bytes(raw)
        else:
            values = tensor.contents.uint_contents
            if len(values) != expected:
                raise InvalidInput(
                    f"input '{IMAGE_INPUT}': shape {shape} needs {expected} values, "
                    f"contents.uint_contents has {len(values)}")
            wide = np.fromiter(values, dtype=np.uint32, count=expected)
            if int(wide.max()) > 255:
                raise InvalidInput(f"input '{IMAGE_INPUT}': UINT8 value out of range (over 255)")
            data = wide.astype(np.uint8).tobytes()
        if len(data) == 0:
            raise InvalidInput(f"input '{IMAGE_INPUT}': empty image data")
        if len(data) != expected:
            raise InvalidInput(
                f"input '{IMAGE_INPUT}': shape {shape} x 1 byte = {expected} bytes, "
                f"but {len(data)} bytes were sent")
        return _encode_png(np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3))

    raise InvalidInput(
        f"input '{IMAGE_INPUT}': datatype '{tensor.datatype}' not supported; use BYTES "
        "(an encoded PNG/JPEG, shape [1]) or UINT8 (shape [H, W, 3])")


def _check_encoded_image(image: bytes, *, max_bytes: int, max_side: int,
                         max_pixels: int | None = None) -> None:
    if len(image) == 0:
        raise InvalidInput(f"input '{IMAGE_INPUT}': empty image")
    if len(image) > max_bytes:
        raise InvalidInput(
            f"input '{IMAGE_INPUT}': {len(image)} bytes exceeds the limit of {max_bytes} bytes")
    w, h = image_size(image)
    if w <= 0 or h <= 0:
        raise InvalidInput(f"input '{IMAGE_INPUT}': empty image ({w}x{h})")
    _check_size(w, h, max_side=max_side, max_pixels=max_pixels)


def _check_size(w: int, h: int, *, max_side: int, max_pixels: int | None) -> None:
    if max(w, h) > max_side:
        raise InvalidInput(
            f"input '{IMAGE_INPUT}': image is {w}x{h}, larger than the limit of "
            f"{max_side} pixels per side")
    if max_pixels is not None and w * h > max_pixels:
        raise InvalidInput(
            f"input '{IMAGE_INPUT}': image is {w}x{h} = {w * h} pixels, more than the limit of "
            f"{max_pixels} pixels")


class _BadHeader(Exception):
    pass


def image_size(image: bytes) -> tuple[int, int]:
    """``(width, height)`` declared by a PNG or JPEG header, read by hand: nothing is
    decompressed and no decoder runs, whatever the header claims. InvalidInput when the
    bytes are neither, or the header is malformed, truncated or ambiguous (two IHDR chunks,
    two JPEG frame headers: a decoder could pick the other one)."""
    try:
        if image.startswith(_PNG_MAGIC):
            return _png_size(image)
        if image.startswith(_JPEG_MAGIC):
            return _jpeg_size(image)
    except _BadHeader as exc:
        raise InvalidInput(f"input '{IMAGE_INPUT}': cannot read the image header ({exc})") from None
    raise InvalidInput(f"input '{IMAGE_INPUT}': not a PNG or JPEG image (bad magic bytes)")


_PNG_COLOR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_size(data: bytes) -> tuple[int, int]:
    """IHDR must come first (PNG spec); every chunk up to the first IDAT must be whole."""
    pos, size, n = len(_PNG_MAGIC), None, len(data)
    while True:
        if pos + 8 > n:
            raise _BadHeader("truncated before the image data" if size else "no IHDR chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if length > 0x7FFFFFFF or end + 4 > n:
            if ctype == b"IDAT" and size is not None:
                raise _BadHeader("the image data is truncated: the first IDAT chunk runs past the end")
            raise _BadHeader(f"chunk {ctype!r} runs past the end of the data")
        if size is None:
            if ctype != b"IHDR" or length != 13:
                raise _BadHeader("the first chunk is not a 13-byte IHDR")
            (crc,) = struct.unpack_from(">I", data, end)
            if zlib.crc32(data[pos + 4:end]) != crc:
                raise _BadHeader("IHDR checksum mismatch")
            w, h, depth, color, comp, filt, interlace = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if depth not in _PNG_COLOR_DEPTHS.get(color, ()) or comp or filt or interlace > 1:
                raise _BadHeader("invalid IHDR fields")
            size = (w, h)
        elif ctype == b"IHDR":
            raise _BadHeader("more than one IHDR chunk")
        elif ctype == b"IDAT":
            return size
        elif ctype == b"IEND":
            raise _BadHeader("no image data")
        pos = end + 4


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Markers from after SOI to the first scan (SOS); exactly one frame header (SOFn)."""
    pos, size, n = 2, None, len(data)
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise _BadHeader("truncated before the image data" if pos >= n else "no JPEG marker found")
        while pos < n and data[pos] == 0xFF:   # fill bytes
            pos += 1
        if pos >= n:
            raise _BadHeader("truncated before the image data")
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # TEM, RSTn: no length
            continue
        if marker in (0xD8, 0xD9):
            raise _BadHeader("no image data")
        if pos + 2 > n:
            raise _BadHeader("truncated before the image data")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > n:
            raise _BadHeader(f"marker 0x{marker:02X} runs past the end of the data")
        if marker in _JPEG_SOF:
            if size is not None:
                raise _BadHeader("more than one frame header")
            if length < 8:
                raise _BadHeader("short frame header")
            h, w = struct.unpack_from(">HH", data, pos + 3)
            size = (w, h)
        elif marker == 0xDA:
            if size is None:
                raise _BadHeader("no frame header before the image data")
            return size
        pos += length


def _encode_png(pixels: np.ndarray) -> bytes:
    import cv2  # deferred: heavy import, needed only for raw UINT8 inputs

    # The tensor is RGB (the OIP convention); OpenCV writes BGR.
    ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 fails only on invalid arrays, excluded above
        raise InvalidInput(f"input '{IMAGE_INPUT}': could not encode the pixels as PNG")
    return buf.tobytes()


def request_timeout_ms(request: pb.ModelInferRequest) -> int | None:
    """The ``timeout`` request parameter in milliseconds, or None when absent."""
    if TIMEOUT_PARAM not in request.parameters:
        return None
    param = request.parameters[TIMEOUT_PARAM]
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        value = param.int64_param
    elif kind == "string_param":
        text = param.string_param.strip()
        try:
            value = int(text)
        except ValueError:
            raise InvalidInput(
                f"parameter '{TIMEOUT_PARAM}': {param.string_param!r} is not an integer "
                "number of milliseconds") from None
    else:
        raise InvalidInput(
            f"parameter '{TIMEOUT_PARAM}' must be an int64 (milliseconds), got {kind or 'nothing'}")
    if value <= 0:
        raise InvalidInput(f"parameter '{TIMEOUT_PARAM}' must be positive, got {value}")
    return value


def request_wants_timing(request: pb.ModelInferRequest) -> bool:
    """The ``timing`` request parameter: True when the client asks for the latency
    breakdown in the response (absent: False)."""
    if TIMING_PARAM not in request.parameters:
        return False
    param = request.parameters[TIMING_PARAM]
    kind = param.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return param.bool_param
    if kind == "string_param" and param.string_param.strip().lower() in ("true", "false"):
        return param.string_param.strip().lower() == "true"
    raise InvalidInput(f"parameter '{TIMING_PARAM}' must be a bool (or \"true\"/\"false\"), got "
                       f"{kind or 'nothing'}" + (f" {param.string_param!r}" if kind == "string_param" else ""))


_IGNORED_OUTPUT_PARAMS = frozenset({"binary_data"})   # KServe's HTTP flag: gRPC outputs are raw anyway


def requested_outputs(request: pb.ModelInferRequest, orientation: bool = False) -> tuple[str, ...] | None:
    """The output names the request asks for (``ModelInferRequest.outputs``), in its
    order, or None when it names none (then every output comes back). InvalidInput for an
    unknown name, a name given twice, or an output parameter the front door does not
    support (``classification``, shared-memory regions)."""
    if not request.outputs:
        return None
    known = ocr_outputs(orientation)
    names: list[str] = []
    for out in request.outputs:
        if out.name not in known:
            raise InvalidInput(f"unknown output '{out.name}'; the outputs are "
                               + ", ".join(f"'{o}'" for o in known))
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested twice")
        unsupported = sorted(k for k in out.parameters if k not in _IGNORED_OUTPUT_PARAMS)
        if unsupported:
            raise InvalidInput(f"output '{out.name}': parameter(s) {', '.join(unsupported)} not "
                               "supported (no classification, no shared memory)")
        names.append(out.name)
    return tuple(names)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class OcrLine:
    """One recognised text line: its text, its quadrilateral (x1,y1..x4,y4 in page
    pixels) and the recogniser's confidence; with an orientation classifier, its
    orientation ("0" / "180") and the classifier's confidence (else None)."""

    text: str
    points: tuple[float, ...]
    confidence: float
    orientation: str | None = None
    orientation_confidence: float | None = None

    def __post_init__(self) -> None:
        pts = tuple(float(p) for p in self.points)
        if len(pts) != 8:
            raise ValueError(f"OcrLine.points needs 8 numbers, got {len(pts)}")
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "confidence", float(self.confidence))
        if self.orientation_confidence is not None:
            object.__setattr__(self, "orientation_confidence", float(self.orientation_confidence))


def set_parameters(target, parameters: Mapping[str, int | str | bool]) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` from a plain dict."""
    for key, value in parameters.items():
        if isinstance(value, bool):  # before int: bool is an int subclass
            target[key].bool_param = value
        elif isinstance(value, (int, np.integer)):
            target[key].int64_param = int(value)
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise TypeError(f"parameter {key!r}: unsupported type {type(value).__name__}")


def read_parameters(source) -> dict[str, int | str | bool]:
    """Inverse of :func:`set_parameters` (unset parameters are skipped)."""
    out: dict[str, int | str | bool] = {}
    for key, param in source.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(param, kind)
    return out


def build_ocr_response(model_name: str, request_id: str, lines: Sequence[OcrLine],
                       parameters: Mapping[str, int | str | bool] | None = None,
                       outputs: Sequence[str] | None = None,
                       orientation: bool = False) -> pb.ModelInferResponse:
    """Outputs text BYTES [N], boxes FP32 [N, 8], confidence FP32 [N] (with
    ``orientation``, also orientation BYTES [N] and orientation_confidence FP32 [N]), all
    raw; with ``outputs`` (names from :func:`ocr_outputs`, see :func:`requested_outputs`)
    those only, in that order."""
    n = len(lines)
    resp = pb.ModelInferResponse(model_name=model_name, id=request_id)
    set_parameters(resp.parameters, parameters or {})
    tensors = {
        TEXT_OUTPUT: lambda: ("BYTES", [n], encode_bytes_tensor(ln.text.encode() for ln in lines)),
        BOXES_OUTPUT: lambda: ("FP32", [n, 8],
                               np.asarray([ln.points for ln in lines], dtype="<f4").reshape(n, 8).tobytes()),
        CONFIDENCE_OUTPUT: lambda: ("FP32", [n],
                                    np.asarray([ln.confidence for ln in lines], dtype="<f4").reshape(n).tobytes()),
        ORIENTATION_OUTPUT: lambda: ("BYTES", [n], encode_bytes_tensor((ln.orientation or "").encode() for ln in lines)),
        ORIENTATION_CONFIDENCE_OUTPUT: lambda: (
            "FP32", [n], np.asarray([ln.orientation_confidence or 0.0 for ln in lines], dtype="<f4").reshape(n).tobytes()),
    }
    for name in ocr_outputs(orientation) if outputs is None else outputs:
        dtype, shape, data = tensors[name]()
        out = resp.outputs.add()
        out.name, out.datatype = name, dtype
        out.shape.extend(shape)
        resp.raw_output_contents.append(data)
    return resp


def parse_ocr_response(resp: pb.ModelInferResponse) -> list[OcrLine]:
    """Read an OCR response, raw (``raw_output_contents``) or typed (``contents``); the
    lines carry orientation when the response has the orientation outputs."""
    n_raw = len(resp.raw_output_contents)
    if n_raw not in (0, len(resp.outputs)):
        raise InvalidInput(
            f"response has {len(resp.outputs)} outputs but {n_raw} raw_output_contents")
    by_name = {out.name: i for i, out in enumerate(resp.outputs)}
    for name in (TEXT_OUTPUT, BOXES_OUTPUT, CONFIDENCE_OUTPUT):
        if name not in by_name:
            raise InvalidInput(f"response has no output '{name}'")

    def tensor(name: str):
        i = by_name[name]
        return resp.outputs[i], (resp.raw_output_contents[i] if n_raw else None)

    out, raw = tensor(TEXT_OUTPUT)
    texts = decode_bytes_tensor(raw) if raw is not None else list(out.contents.bytes_contents)
    n = len(texts)
    boxes = _fp32(*tensor(BOXES_OUTPUT), count=n * 8).reshape(n, 8)
    conf = _fp32(*tensor(CONFIDENCE_OUTPUT), count=n)
    try:
        lines = [OcrLine(t.decode("utf-8"), tuple(boxes[i].tolist()), float(conf[i]))
                 for i, t in enumerate(texts)]
    except UnicodeDecodeError:
        raise InvalidInput("response output 'text' is not valid UTF-8") from None
    if ORIENTATION_OUTPUT not in by_name:
        return lines
    out, raw = tensor(ORIENTATION_OUTPUT)
    labels = decode_bytes_tensor(raw) if raw is not None else list(out.contents.bytes_contents)
    if len(labels) != n:
        raise InvalidInput(f"response output '{ORIENTATION_OUTPUT}': {len(labels)} items, expected {n}")
    oconf = (_fp32(*tensor(ORIENTATION_CONFIDENCE_OUTPUT), count=n) if ORIENTATION_CONFIDENCE_OUTPUT in by_name
             else np.zeros(n, np.float32))
    try:
        return [OcrLine(ln.text, ln.points, ln.confidence, labels[i].decode("utf-8"), float(oconf[i]))
                for i, ln in enumerate(lines)]
    except UnicodeDecodeError:
        raise InvalidInput(f"response output '{ORIENTATION_OUTPUT}' is not valid UTF-8") from None


def _fp32(out, raw: bytes | None, *, count: int) -> np.ndarray:
    if out.datatype != "FP32":
        raise InvalidInput(f"response output '{out.name}': datatype {out.datatype}, expected FP32")
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidInput(
                f"response output '{out.name}': {len(raw)} bytes, expected {count} x 4")
        return np.frombuffer(raw, dtype="<f4")
    values = np.asarray(out.contents.fp32_contents, dtype=np.float32)
    if values.size != count:
        raise InvalidInput(
            f"response output '{out.name}': {values.size} values, expected {count}")
    return values


def model_metadata(name: str, *, versions: Sequence[str] = (),
                   platform: str = "pipeserve", orientation: bool = False) -> pb.ModelMetadataResponse:
    """Metadata of an OCR pipeline served as an OIP model (-1 = variable dimension); with
    ``orientation``, the orientation outputs too."""
    T = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=name, versions=list(versions), platform=platform,
        inputs=[T(name=IMAGE_INPUT, datatype="BYTES", shape=[1])],
        outputs=[
            T(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1]),
            T(name=BOXES_OUTPUT, datatype="FP32", shape=[-1, 8]),
            T(name=CONFIDENCE_OUTPUT, datatype="FP32", shape=[-1]),
        ] + ([T(name=ORIENTATION_OUTPUT, datatype="BYTES", shape=[-1]),
              T(name=ORIENTATION_CONFIDENCE_OUTPUT, datatype="FP32", shape=[-1])] if orientation else []),
    )


_CONFIG_TYPE = {"BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
                "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
                "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
                "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
                "BYTES": mc.TYPE_STRING, "BF16": mc.TYPE_BF16}


def model_config(name: str, *, version: str = "1", platform: str = "pipeserve",
                 parameters: Mapping[str, str] | None = None, orientation: bool = False) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` of the pipeline served as one model: the inputs and
    outputs of :func:`model_metadata` with Triton's data types, ``max_batch_size`` 0 (one
    image per request: shapes carry no batch dimension), the one ``version`` (an integer
    string) as a specific version policy, one response per request (not decoupled), and
    ``parameters`` as string-valued model parameters."""
    if not version.isdigit():
        raise ValueError(f"version must be an integer string, got {version!r}")
    meta = model_metadata(name, versions=[version], platform=platform, orientation=orientation)
    return mc.ModelConfig(
        name=name, platform=platform, backend=platform, max_batch_size=0,
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[int(version)])),
        input=[mc.ModelInput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.shape))
               for t in meta.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.shape))
                for t in meta.outputs],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in (parameters or {}).items()},
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False))
