"""Text-line orientation accuracy: detected lines' labels ("0" / "180") against the ground
truth angles of pages made with ``pipeserve-make-pages --rotate-fraction``.

Matching: each ground-truth line takes the detected box that covers the largest part of its
tight box (axis-aligned bounds of the detected quadrilateral); it counts as correct when
that box covers at least ``MIN_COVER`` of it and the box's label is the line's angle. A
line no box covers (a detector miss) counts as wrong, so the accuracy of a (detector,
classifier) path includes the detector's misses, as the CER of a (detector, recogniser)
path does.
"""
from __future__ import annotations

from typing import Sequence

MIN_COVER = 0.5


def _bounds(points: Sequence[float]) -> tuple[float, float, float, float]:
    xs, ys = points[0::2], points[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def orientation_hits(pred: Sequence[tuple[str, Sequence[float]]], truth_lines: Sequence) -> list[bool]:
    """For every ground-truth line (``.box``, ``.angle``), whether the detected line
    (``(label, points8)``) that covers it best carries its angle as label."""
    boxes = [(label, _bounds(pts)) for label, pts in pred]
    hits = []
    for ln in truth_lines:
        tx0, ty0, tx1, ty1 = _bounds(ln.box)
        area = max(1e-6, (tx1 - tx0) * (ty1 - ty0))
        best, cover = None, 0.0
        for label, (x0, y0, x1, y1) in boxes:
            c = max(0.0, min(x1, tx1) - max(x0, tx0)) * max(0.0, min(y1, ty1) - max(y0, ty0)) / area
            if c > cover:
                best, cover = label, c
        hits.append(cover >= MIN_COVER and best == str(int(getattr(ln, "angle", 0))))
    return hits


def orientation_accuracy(pred: Sequence[tuple[str, Sequence[float]]], truth_lines: Sequence) -> float:
    """Fraction of ground-truth lines whose orientation is read right (1.0 for no lines)."""
    hits = orientation_hits(pred, truth_lines)
    return sum(hits) / len(hits) if hits else 1.0
