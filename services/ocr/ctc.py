"""CTC character sets and greedy decoding for PaddleOCR recognisers (pure numpy)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

BLANK = "<blank>"


def load_charset(path: str | Path, use_space_char: bool = True) -> list[str]:
    """The recogniser's class list: index 0 is the CTC blank, then one dictionary line per
    class (line endings ``\\n`` or ``\\r\\n`` removed, nothing else stripped), then ``" "``
    when ``use_space_char`` (PaddleOCR's convention). Its length must equal the model's
    output dimension."""
    text = Path(path).read_text(encoding="utf-8")
    chars = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if chars and chars[-1] == "":
        chars.pop()
    return [BLANK, *chars, *([" "] if use_space_char else [])]


def ctc_greedy_decode(probs: np.ndarray, charset: list[str]) -> tuple[str, float]:
    """Decode one ``(T, C)`` matrix of per-step class probabilities.

    Takes the arg-max class per step, collapses repeats, removes blanks (class 0). Returns
    ``(text, confidence)`` with confidence = mean max-probability of the kept steps, 0.0
    when nothing is kept.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(charset):
        raise ValueError(f"expected (T, {len(charset)}) probabilities, got {probs.shape}")
    idx = probs.argmax(axis=1)
    best = probs[np.arange(len(idx)), idx]
    keep = idx != 0
    keep[1:] &= idx[1:] != idx[:-1]
    text = "".join(charset[i] for i in idx[keep])
    conf = float(best[keep].mean()) if keep.any() else 0.0
    return text, conf


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
