"""The ``echo`` processor: the payload's bytes through an ONNX Identity model, unchanged.

``prepare`` checks the payload is not empty and views it as a ``uint8`` vector (no
copy). ``run_batch`` concatenates the batch's items into one vector, runs it through the
session once (a real ONNX Runtime call), and splits the output back, so a batch of any
size costs one ``session.run``. Each item gives one region whose ``text`` is the digest
of the bytes that came out of the model (``<length>:<crc32 hex>``, see :func:`digest`)
and ``score`` their length. With the setting ``forward: true`` (a parent stage) the
item's one child payload is those bytes, so the child stage gets exactly one query per
request, carrying the request's bytes.

Settings: ``forward`` (bool, default false).
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from services.common.errors import InvalidInput
from services.common.processing import ItemResult, Prepared, Processor, RegionOut, register_processor

__all__ = ["EchoProcessor", "digest"]


def digest(data: bytes) -> str:
    """``"<length>:<crc32, 8 hex digits>"``: what an echo region says of its bytes."""
    return f"{len(data)}:{zlib.crc32(data):08x}"


@register_processor("echo")
class EchoProcessor(Processor):
    @property
    def forward(self) -> bool:
        return bool(self.variant.settings.get("forward", False))

    def prepare(self, payload: bytes) -> Prepared:
        if not payload:
            raise InvalidInput("empty payload")
        return Prepared(np.frombuffer(payload, dtype=np.uint8))

    def run_batch(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        if not items:
            return []
        name = self.variant.input_names[0] if self.variant.input_names else session.get_inputs()[0].name
        outputs = list(self.variant.output_names) or None
        flat = items[0].data if len(items) == 1 else np.concatenate([p.data for p in items])
        (out,) = session.run(outputs, {name: flat})
        results, start = [], 0
        for p in items:
            data = out[start:start + p.data.size].tobytes()
            start += p.data.size
            region = RegionOut(text=digest(data), score=float(len(data)))
            results.append(ItemResult(regions=(region,), child_payloads=(data,) if self.forward else ()))
        return results
