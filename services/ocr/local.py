"""Run the OCR pipeline in-process (detector then recogniser), the reference for tests and
measurements: same processors and sessions as the workers, no gRPC."""
from __future__ import annotations

from typing import Any

from services.ocr.processors import DetProcessor, RecProcessor


def run_ocr_page(png: bytes, det_proc: DetProcessor, det_session: Any, rec_proc: RecProcessor,
                 rec_session: Any, rec_batch: int = 16) -> list[tuple[str, tuple[float, ...], float]]:
    """OCR one encoded page: ``[(text, points8, confidence)]`` in reading order, one entry per
    detected box (empty text when the recogniser reads nothing)."""
    det = det_proc.run_batch(det_session, [det_proc.prepare(png)])[0]
    crops = [rec_proc.prepare(c) for c in det.child_payloads]
    texts = []
    for start in range(0, len(crops), rec_batch):
        texts += rec_proc.run_batch(rec_session, crops[start:start + rec_batch])
    return [(r.regions[0].text, box.points, r.regions[0].confidence) for box, r in zip(det.regions, texts)]
