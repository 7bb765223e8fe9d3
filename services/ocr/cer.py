"""Character error rate (CER) of OCR output against ground truth.

Definition used everywhere in this project:

    CER = levenshtein(prediction, truth) / len(truth)

where the Levenshtein distance counts single-character insertions, deletions and
substitutions (each cost 1). For a page, both sides are the page's lines in reading order
(rows top to bottom, left to right within a row; see :func:`reading_order`) joined with
``"\\n"``, so a missed, split or merged line costs its characters or its separator. CER is not
clipped: many spurious characters can push it above 1. An empty truth gives 0.0 for an empty
prediction and 1.0 otherwise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from services.ocr.geometry import reading_order


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b``; O(len(a) * len(b)) work, vectorised per row."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    aa = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32)
    bb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1)
    prev = idx.copy()
    for i, ch in enumerate(aa):
        cost = (bb != ch).astype(np.int64)
        # cur[j] = min(prev[j] + 1, prev[j-1] + cost[j-1], cur[j-1] + 1): the last term (a run
        # of insertions) is a running minimum of tmp[k] - k, shifted back by + j.
        tmp = np.empty_like(prev)
        tmp[0] = i + 1
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        prev = np.minimum.accumulate(tmp - idx) + idx
    return int(prev[-1])


def cer(pred: str, truth: str) -> float:
    """``levenshtein(pred, truth) / len(truth)`` (see the module docstring for empty truth)."""
    if not truth:
        return 0.0 if not pred else 1.0
    return levenshtein(pred, truth) / len(truth)


def page_text(lines: Sequence[tuple[str, Sequence[float]]]) -> str:
    """Texts of ``(text, points8)`` lines in reading order, joined with newlines."""
    order = reading_order([np.asarray(p, dtype=np.float64).reshape(4, 2) for _, p in lines])
    return "\n".join(lines[i][0] for i in order)


def page_cer(pred_lines: Sequence[tuple[str, Sequence[float]]], truth_lines: Sequence) -> float:
    """CER of one page. ``truth_lines`` are ``(text, points8)`` pairs or objects with ``.text``
    and ``.box`` (e.g. :class:`services.ocr.pages.TruthLine`)."""
    truth = [(t.text, t.box) if hasattr(t, "text") else (t[0], t[1]) for t in truth_lines]
    return cer(page_text(pred_lines), page_text(truth))
