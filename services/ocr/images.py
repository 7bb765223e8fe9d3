"""Image payloads of the OCR stages, and the uint8 models that take them without CPU
normalisation.

Payloads: pages arrive as PNG/JPEG/...; the detector sends each crop to the line models as
JPEG, PNG or a raw tensor (:func:`encode_raw`: a 16-byte header and the BGR pixels, which
costs no encoding or decoding and, being lossless, gives the line models exactly the crop
the detector cut). :func:`decode_image` takes all of them.

Folded models: ``<name>.u8.onnx`` next to ``<name>.onnx`` takes uint8 NHWC pixels and each
item's valid size, and normalises in the graph (written by :mod:`services.ocr.fold` at
``make models`` time). :func:`folded_model` says whether a processor may use one.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from services.common.errors import InvalidInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VALID_INPUT = "pipeserve_valid"   # the folded models' second input: int64 N x 2 (rows, cols)
FOLD_LAYOUT = "NHWC"

RAW_MAGIC = b"PSRT"
RAW_HEADER = struct.Struct("<4sBBHII")   # magic, version, dtype, channels, height, width
RAW_VERSION = 1
RAW_UINT8 = 1
CROP_FORMATS = ("jpeg", "png", "raw")


def encode_raw(image: np.ndarray) -> bytes:
    """A uint8 ``H x W x 3`` array as a raw tensor payload: :data:`RAW_HEADER` (magic
    ``PSRT``, version 1, dtype 1 = uint8, channels, height, width; little-endian) then the
    pixels in C order."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a raw payload holds a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    return RAW_HEADER.pack(RAW_MAGIC, RAW_VERSION, RAW_UINT8, 3, h, w) + np.ascontiguousarray(image).tobytes()


def decode_raw(payload: bytes, max_side: int = 8192) -> np.ndarray:
    """The image of a raw tensor payload (read-only, no copy). Raises :class:`InvalidInput`
    for a short or unknown header, a dtype or channel count other than uint8 x 3, a side of 0
    or above ``max_side``, or a body whose length is not exactly height x width x 3."""
    if len(payload) < RAW_HEADER.size:
        raise InvalidInput(f"raw tensor payload of {len(payload)} bytes is shorter than its "
                           f"{RAW_HEADER.size}-byte header")
    magic, version, dtype, channels, h, w = RAW_HEADER.unpack_from(payload)
    if magic != RAW_MAGIC:
        raise InvalidInput("payload is not a raw tensor (bad magic)")
    if version != RAW_VERSION:
        raise InvalidInput(f"raw tensor version {version} is not supported (only {RAW_VERSION})")
    if dtype != RAW_UINT8 or channels != 3:
        raise InvalidInput(f"raw tensor must be uint8 with 3 channels, got dtype code {dtype}, "
                           f"{channels} channels")
    if not (0 < h <= max_side and 0 < w <= max_side):
        raise InvalidInput(f"raw tensor is {w}x{h}: each side must be 1..{max_side} px")
    body = len(payload) - RAW_HEADER.size
    if body != h * w * 3:
        raise InvalidInput(f"raw tensor {w}x{h}x3 needs {h * w * 3} bytes of pixels, got {body}")
    return np.frombuffer(payload, np.uint8, offset=RAW_HEADER.size).reshape(h, w, 3)


# 8-bit PNG modes OpenCV decodes to the very pixels Pillow's convert("RGB") gives (alpha
# and a palette's transparency dropped, grey replicated); tests/unit/test_ocr_images.py
CV2_PNG_MODES = ("RGB", "RGBA", "L", "LA", "P")


def decode_image(payload: bytes, max_side: int = 8192, fast_png: bool = True) -> np.ndarray:
    """Decode PNG/JPEG/... bytes or a raw tensor payload (:func:`encode_raw`) to an
    ``H x W x 3`` BGR uint8 array (PaddleOCR's channel order; read-only for raw payloads).

    Pillow reads the header (format, size, mode) and decodes; an 8-bit PNG
    (:data:`CV2_PNG_MODES`) is decoded by OpenCV instead, straight to BGR: 1.8x less CPU
    on the eval pages, the same pixels (``fast_png=False``: Pillow, for comparison).
    Raises :class:`InvalidInput` for empty, undecodable or truncated bytes and for images
    with a side above ``max_side`` (checked from the header, before decoding pixels).
    """
    if not payload:
        raise InvalidInput("empty image payload")
    if payload[:len(RAW_MAGIC)] == RAW_MAGIC:
        return decode_raw(payload, max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(payload))
            if max(img.size) > max_side:
                raise InvalidInput(f"image is {img.size[0]}x{img.size[1]}, larger than {max_side} px")
            if fast_png and img.format == "PNG" and img.mode in CV2_PNG_MODES:
                bgr = cv2.imdecode(np.frombuffer(payload, np.uint8),
                                   cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
                if bgr is None or bgr.shape[:2] != (img.size[1], img.size[0]):
                    raise InvalidInput("payload is not a decodable image: truncated or corrupt PNG")
                return bgr
            img.load()   # raises OSError on truncated data
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"payload is not a decodable image: {exc}") from None
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode a BGR array as PNG (lossless), JPEG (``quality``) or a raw tensor payload."""
    if fmt == "raw":
        return encode_raw(image)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif fmt in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        raise ValueError(f"unknown crop format {fmt!r} ({', '.join(CROP_FORMATS)})")
    if not ok:
        raise RuntimeError("OpenCV failed to encode a crop")
    return buf.tobytes()


def folded_paths(model: Path) -> tuple[Path, Path]:
    """``(<name>.u8.onnx, <name>.u8.json)`` beside ``<name>.onnx``."""
    stem = model.with_suffix("")
    return stem.with_suffix(".u8.onnx"), stem.with_suffix(".u8.json")


def folded_model(model: Path, mean, std, pad: float) -> tuple[Path | None, str]:
    """The folded uint8 model to use instead of ``model`` for a processor that normalises
    with ``mean``/``std`` and pads with ``pad``, or None, and why in words (logged by the
    processor): the folded file or its record is missing, was made from another source
    file, or folds other constants."""
    path, record = folded_paths(model)
    if not path.is_file() or not record.is_file():
        return None, f"no {path.name} (make models writes it with the onnx package)"
    try:
        rec = json.loads(record.read_text())
        source_bytes = model.stat().st_size if model.is_file() else None
        same = (np.allclose(rec["mean"], mean, rtol=0, atol=1e-7) and np.allclose(rec["std"], std, rtol=0, atol=1e-7)
                and abs(float(rec["pad"]) - float(pad)) <= 1e-7)
        layout, valid, made_from = rec["layout"], rec["valid_input"], rec["source_bytes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{record.name} is unreadable: {exc}"
    if (layout, valid) != (FOLD_LAYOUT, VALID_INPUT):
        return None, f"{path.name} takes {layout} and {valid!r}, this code feeds {FOLD_LAYOUT} and {VALID_INPUT!r}"
    if made_from != source_bytes:
        return None, f"{path.name} was made from a {made_from}-byte {model.name}, which is now {source_bytes} bytes"
    if not same:
        return None, (f"{path.name} folds mean {rec['mean']} std {rec['std']} pad {rec['pad']}, the "
                      f"variant's are {list(mean)} {list(std)} {pad}")
    return path, f"{path.name}: uint8 input, normalisation in the model"
