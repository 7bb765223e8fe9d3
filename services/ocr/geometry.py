"""Pure geometry for text detection: DB post-processing, reading order and quad crops.

Everything here is numpy + OpenCV over explicit inputs (no models, no I/O), so it is unit
tested on synthetic probability maps. Boxes are ``(4, 2)`` float32 arrays of points ordered
clockwise from the top-left corner: top-left, top-right, bottom-right, bottom-left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class DBParams:
    """DB (differentiable binarisation) post-processing parameters, PaddleOCR's meaning."""

    thresh: float = 0.3          # pixel probability to binarise at
    box_thresh: float = 0.6      # minimum mean probability inside a candidate box
    unclip_ratio: float = 1.5    # expansion: distance = area * ratio / perimeter
    max_candidates: int = 1000   # contours considered, largest first
    min_size: float = 3.0        # minimum short side of a box, in probability-map pixels


def order_points(pts: np.ndarray) -> np.ndarray:
    """Order 4 points clockwise from the top-left (for boxes rotated less than 45 degrees)."""
    pts = np.asarray(pts, dtype=np.float32).reshape(4, 2)
    by_x = pts[np.argsort(pts[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    tl, bl = left[np.argsort(left[:, 1], kind="stable")]
    tr, br = right[np.argsort(right[:, 1], kind="stable")]
    return np.stack([tl, tr, br, bl]).astype(np.float32)


def unclip_rect(rect: tuple, ratio: float) -> tuple:
    """Expand a rotated rectangle ``((cx, cy), (w, h), angle)`` by the DB unclip distance.

    Offsetting a w x h rectangle outwards by d and taking the minimum-area rectangle of the
    result gives (w + 2d) x (h + 2d); d = area * ratio / perimeter as in the DB paper.
    """
    (cx, cy), (w, h), angle = rect
    perimeter = 2.0 * (w + h)
    d = (w * h * ratio / perimeter) if perimeter > 0 else 0.0
    return ((cx, cy), (w + 2 * d, h + 2 * d), angle)


def box_score(prob: np.ndarray, box: np.ndarray) -> float:
    """Mean of ``prob`` inside the polygon ``box`` (evaluated on its bounding window)."""
    h, w = prob.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    shifted = (box - np.array([xmin, ymin], dtype=np.float32)).round().astype(np.int32)
    cv2.fillPoly(mask, [shifted], 1)
    return float(cv2.mean(prob[ymin:ymax + 1, xmin:xmax + 1], mask)[0])


def db_boxes(prob: np.ndarray, params: DBParams = DBParams()) -> list[tuple[np.ndarray, float]]:
    """Text boxes from a DB probability map ``prob`` (H x W floats in [0, 1]).

    Binarise at ``thresh``, take external contours, fit a minimum-area rectangle to each,
    keep it when its short side >= ``min_size`` and the mean probability inside >=
    ``box_thresh``, expand it by the unclip distance, and clip it to the map. Returns
    ``[(box (4, 2) float32 in map pixels, score)]`` in no particular order.
    """
    prob = np.asarray(prob, dtype=np.float32)
    h, w = prob.shape
    bitmap = (prob > params.thresh).astype(np.uint8)
    contours, _ = cv2.findContours(bitmap, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)[: params.max_candidates]
    out: list[tuple[np.ndarray, float]] = []
    for contour in contours:
        rect = cv2.minAreaRect(contour)
        if min(rect[1]) < params.min_size:
            continue
        score = box_score(prob, order_points(cv2.boxPoints(rect)))
        if score < params.box_thresh:
            continue
        big = unclip_rect(rect, params.unclip_ratio)
        if min(big[1]) < params.min_size + 2:
            continue
        box = order_points(cv2.boxPoints(big))
        box[:, 0] = np.clip(box[:, 0], 0, w)
        box[:, 1] = np.clip(box[:, 1], 0, h)
        out.append((box, score))
    return out


def reading_order(boxes: Sequence[np.ndarray]) -> list[int]:
    """Indices of ``boxes`` in reading order: rows top to bottom, left to right in a row.

    Two boxes share a row when the centre of one lies within half the height of the row's
    first box from that box's centre. Deterministic for equal inputs.
    """
    if not len(boxes):
        return []
    arr = np.asarray([np.asarray(b, dtype=np.float64).reshape(4, 2) for b in boxes])
    cy = arr[:, :, 1].mean(axis=1)
    height = np.maximum(arr[:, :, 1].max(axis=1) - arr[:, :, 1].min(axis=1), 1.0)
    left = arr[:, :, 0].min(axis=1)
    rows: list[list[int]] = []
    for i in np.lexsort((left, cy)):          # by centre y, then x
        if rows and abs(cy[i] - cy[rows[-1][0]]) <= 0.5 * height[rows[-1][0]]:
            rows[-1].append(int(i))
        else:
            rows.append([int(i)])
    return [i for row in rows for i in sorted(row, key=lambda k: (left[k], cy[k]))]


def crop_quad(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Perspective-warp the quad ``box`` (TL, TR, BR, BL) out of ``image`` to an upright
    rectangle; crops at least 1.5x taller than wide are rotated 90 degrees (vertical text)."""
    box = np.asarray(box, dtype=np.float32).reshape(4, 2)
    width = int(round(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3]))))
    height = int(round(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2]))))
    width, height = max(width, 1), max(height, 1)
    dst = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    matrix = cv2.getPerspectiveTransform(box, dst)
    crop = cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)
    if height >= 1.5 * width:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop
