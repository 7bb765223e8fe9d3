"""One loaded model variant (:class:`ModelHost`): its processor, its ONNX Runtime session,
its batch-time estimator and its warm-up. A worker holds several in its slot table
(``services/worker/slots.py``)."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.common.memory import malloc_trim
from services.common.onnx import (DEFAULT_CUDNN_ALGO_SEARCH, BatchPaddedSession, create_session, padded_batch,
                                  pads_batches)
from services.common.processing import Prepared, Processor, make_processor
from services.common.spec import VariantSpec
from services.policy.batching import ServiceTimeEstimator

INLINE_PREP_ITEM_S = 20e-6  # an item prepared faster than this is "cheap" (a hand-off costs 50-90 us)
INLINE_PREP_STREAK = 32     # cheap items in a row before a model's inputs are prepared on the loop
INLINE_PREP_BUDGET_S = 100e-6   # at most this much preparing on the loop per request (5 cheap items)


@dataclass
class ModelHost:
    """One loaded variant: its processor and ONNX Runtime session."""

    variant: VariantSpec
    processor: Processor
    session: object
    providers: list[str]
    estimator: ServiceTimeEstimator = field(default_factory=ServiceTimeEstimator)
    batches: int = 0          # batches run on this host (the first few are not reported)
    cheap_prep_streak: int = 0   # items in a row prepared in under INLINE_PREP_ITEM_S
    warmed: set = field(default_factory=set)   # (shape bucket, batch size) run by warm_up
    warm_items: list | None = None   # warm_up's inputs, one per bucket (None: never warmed)
    padded: bool = False      # the session pads batch sizes to powers of two (BatchPaddedSession)

    def prepare_inline(self, n: int) -> bool:
        """Whether a request of ``n`` items is prepared on the event loop (see
        ``services/worker/core.py``): the thread hand-off would cost more than the work."""
        return self.cheap_prep_streak >= INLINE_PREP_STREAK and n * INLINE_PREP_ITEM_S <= INLINE_PREP_BUDGET_S

    def observe_prepare(self, prepared: list) -> None:
        for item in prepared:
            cheap = not isinstance(item, BaseException) and item[1] < INLINE_PREP_ITEM_S
            self.cheap_prep_streak = self.cheap_prep_streak + 1 if cheap else 0

    @staticmethod
    def load(variant: VariantSpec, models_dir: Path, prefer_gpu: bool, threads: int,
             plugins: tuple[str, ...] = (), max_batch: int = 1,
             cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH,
             batch_padding: str = "auto") -> "ModelHost":
        processor = make_processor(variant, models_dir, plugins)
        session, providers = create_session(processor.model_path, prefer_gpu=prefer_gpu,
                                            intra_op_threads=threads,
                                            cudnn_conv_algo_search=cudnn_conv_algo_search)
        padded = pads_batches(batch_padding, providers)
        host = ModelHost(variant, processor, BatchPaddedSession(session) if padded else session, providers,
                         padded=padded)
        host.warm_up(max_batch)
        return host

    def warm_up(self, max_batch: int = 1) -> None:
        """Before the host serves: run the processor's warm-up inputs (one per shape bucket)
        at the batch sizes :func:`warm_batch_sizes` gives for ``max_batch``, each once (the
        first twice: a fresh session's first runs allocate); pairs run before are skipped.
        On a GPU every new input shape costs a cuDNN algorithm search."""
        if self.warm_items is None:
            self.warm_items = self.processor.warmup_items()
        sizes = warm_batch_sizes(max_batch, "CUDAExecutionProvider" in self.providers, self.padded)
        for item in self.warm_items:
            for b in sizes:
                if (item.bucket, b) not in self.warmed:
                    for _ in range(1 if self.warmed else 2):
                        self.processor.run_batch(self.session, [item] * b)
                    self.warmed.add((item.bucket, b))

    def needs_warm_up(self, max_batch: int) -> bool:
        """Whether batches up to ``max_batch`` would meet a shape :meth:`warm_up` has not run."""
        return bool(self.warm_items) and any(
            (it.bucket, b) not in self.warmed for it in self.warm_items
            for b in warm_batch_sizes(max_batch, "CUDAExecutionProvider" in self.providers, self.padded))


def warm_batch_sizes(max_batch: int, gpu: bool, padded: bool = False) -> tuple[int, ...]:
    """The batch sizes a model is warmed at for batches of up to ``max_batch``: on a GPU
    every size (the work-conserving batcher runs partial batches, and each size is a new
    shape to cuDNN), or with batch padding (:class:`BatchPaddedSession`) the powers of two
    up to it, the only sizes ONNX Runtime then sees; on a CPU batch 1 only: there a new
    shape costs about one more run (an allocation, not a search), and warming rec_v6small's
    4 buckets at batch 32 took 10 s of CPU (docs/gpu.md)."""
    top = max(1, int(max_batch))
    if not gpu:
        return (1,)
    if padded:
        return tuple(1 << k for k in range(padded_batch(top).bit_length()))
    return tuple(range(1, top + 1))


def model_file_mb(models_dir: Path, variant: VariantSpec) -> float:
    """The size estimate of ``variant`` in memory: its ONNX file's size (its weights; the
    session's activation buffers come on top), 0 when the file is missing (the load then
    fails with a clear error of its own)."""
    try:
        return (Path(models_dir) / variant.model).stat().st_size / 2**20
    except OSError:
        return 0.0


def release_memory() -> None:
    """Collect garbage and ask glibc's allocator to return freed pages to the OS, so a
    freed model shows up as lower RSS (no-op where there is no ``malloc_trim``)."""
    gc.collect()
    malloc_trim()


def prepare_all(prepare: Callable[[bytes], Prepared], payloads: list[bytes]) -> list:
    """``(prepared, seconds)`` per payload, or the exception ``prepare`` raised for it."""
    out: list = []
    for payload in payloads:
        t0 = time.perf_counter()
        try:
            out.append((prepare(payload), time.perf_counter() - t0))
        except Exception as exc:   # noqa: BLE001 - one bad payload fails its query only
            out.append(exc)
    return out
