"""The seam between a worker and a model variant's pre/post-processing.

A :class:`Processor` is pure code around one ONNX Runtime session: it decodes and
preprocesses one query's payload (``prepare``, called off the event loop, once per
query at arrival) and runs a batch of prepared items through the session
(``run_batch``, called off the event loop). It never touches gRPC or Redis.

Processors register themselves by kind (the ``processor`` field of a variant in the
pipeline spec) with :func:`register_processor`, in modules the spec names as its
``plugins`` (the OCR pipeline: ``services.ocr.processors``); ``make_processor`` imports
those and builds one. This generic layer imports no application code itself.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable

from services.common.spec import VariantSpec


@dataclass(frozen=True)
class RegionOut:
    """One output region. Detectors fill points (x1,y1..x4,y4, parent pixel coordinates)
    and score; recognisers/classifiers fill text (or label) and confidence."""

    points: tuple[float, ...] = ()
    score: float = 0.0
    text: str = ""
    confidence: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class ItemResult:
    """What one query produced. ``child_payloads[i]`` is the encoded input (e.g. a PNG
    crop) for the child task(s) derived from ``regions[i]``; empty for leaf tasks.
    ``encode_s``: the seconds spent encoding those payloads (the worker reports it apart
    from the rest of the post-processing in the latency breakdown)."""

    regions: tuple[RegionOut, ...] = ()
    child_payloads: tuple[bytes, ...] = ()
    encode_s: float = 0.0


@dataclass
class Prepared:
    """A query's preprocessed input, ready to be batched. ``data`` is processor-defined
    (e.g. a normalised CHW float32 array plus the geometry needed to map boxes back).
    ``bucket``: the input shape bucket it was padded to (None: the processor has none);
    items of different buckets never share a model run (the worker batches within a
    bucket, and ``run_batch`` splits a mixed list by :func:`split_by_bucket`)."""

    data: Any
    meta: dict[str, Any] = field(default_factory=dict)
    bucket: Hashable = None


def split_by_bucket(items: list[Prepared]) -> list[list[int]]:
    """Indices of ``items`` grouped by bucket, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.bucket, []).append(i)
    return list(groups.values())


class Processor(ABC):
    """Pre/post-processing for one variant. Must be thread-safe for ``prepare``
    (called concurrently from an executor); ``run_batch`` is called from one thread
    at a time per session."""

    def __init__(self, variant: VariantSpec, model_dir: Path) -> None:
        self.variant = variant
        self.model_dir = Path(model_dir)

    @property
    def model_path(self) -> Path:
        return self.model_dir / self.variant.model

    @abstractmethod
    def prepare(self, payload: bytes) -> Prepared:
        """Decode and preprocess one payload. Raise ``InvalidInput`` for bad bytes."""

    def warmup_payload(self) -> bytes | None:
        """A representative input to run once when the model loads (a fresh ONNX Runtime
        session's first runs are several times slower), or None for no warm-up."""
        return None

    def shape_buckets(self) -> tuple[Hashable, ...]:
        """The input shape buckets this processor pads to (empty: none, shapes unbounded)."""
        return ()

    def warmup_items(self) -> list[Prepared]:
        """Prepared inputs to warm the model with: one per shape bucket where there are
        buckets (the worker runs each at every batch size it may use), else the warm-up
        payload prepared once (none without one)."""
        payload = self.warmup_payload()
        return [] if payload is None else [self.prepare(payload)]

    @abstractmethod
    def run_batch(self, session: Any, items: list[Prepared]) -> list[ItemResult]:
        """Run ``items`` through the ONNX ``session`` as one or more batched calls and
        return exactly one result per item, in order."""


_REGISTRY: dict[str, Callable[[VariantSpec, Path], Processor]] = {}


def register_processor(kind: str) -> Callable[[type[Processor]], type[Processor]]:
    def deco(cls: type[Processor]) -> type[Processor]:
        _REGISTRY[kind] = cls
        return cls
    return deco


def load_plugins(modules: tuple[str, ...] | list[str]) -> None:
    """Import the modules that register processors (a spec's ``plugins``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise KeyError(f"cannot import processor plugin {name!r}: {exc}") from None


def make_processor(variant: VariantSpec, model_dir: Path, plugins: tuple[str, ...] | list[str] = ()) -> Processor:
    load_plugins(plugins)
    try:
        factory = _REGISTRY[variant.processor]
    except KeyError:
        raise KeyError(f"variant {variant.name!r}: unknown processor kind {variant.processor!r}; "
                       f"known: {sorted(_REGISTRY)} (is the module that registers it in the "
                       f"spec's plugins?)") from None
    return factory(variant, model_dir)
