"""ONNX Runtime session creation: CUDA first where present, and an honest record of
which execution providers the session actually got."""
from __future__ import annotations

from pathlib import Path
from typing import Any


CUDNN_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
DEFAULT_CUDNN_ALGO_SEARCH = "HEURISTIC"   # to be chosen by measurement on a GPU: docs/gpu.md


def cuda_provider_options(device_id: int = 0, cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH
                          ) -> dict[str, str]:
    """The CUDA execution provider's options for a session.

    ``cudnn_conv_algo_search``: how cuDNN picks a convolution algorithm for each new input
    shape. ONNX Runtime's default, EXHAUSTIVE, benchmarks every algorithm (0.6-2.5 s per
    new shape on the detector, an H200); HEURISTIC asks cuDNN's heuristics; DEFAULT takes
    a fixed algorithm (rec's convolutions then ran in "Fallback mode", 87 ms). With shape
    buckets a worker meets each shape once, at warm-up. Raises ValueError for another value."""
    mode = str(cudnn_conv_algo_search).upper()
    if mode not in CUDNN_ALGO_SEARCH:
        raise ValueError(f"cudnn_conv_algo_search must be one of {', '.join(CUDNN_ALGO_SEARCH)}, "
                         f"got {cudnn_conv_algo_search!r}")
    return {"device_id": str(int(device_id)), "cudnn_conv_algo_search": mode}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def create_session(model_path: str | Path, *, prefer_gpu: bool = True, intra_op_threads: int = 1,
                   device_id: int = 0, cudnn_conv_algo_search: str = DEFAULT_CUDNN_ALGO_SEARCH
                   ) -> tuple[Any, list[str]]:
    """Load ``model_path`` and return ``(session, providers_the_session_got)``. On the CUDA
    provider with :func:`cuda_provider_options`.

    ``intra_op_threads`` defaults to 1: on a small CPU host several workers share the
    cores, and one thread per session keeps them from fighting over them.
    """
    import onnxruntime as ort

    cuda_options = cuda_provider_options(device_id, cudnn_conv_algo_search)   # a bad value fails on CPU too
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (run `make models`)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(intra_op_threads))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    wanted: list[Any] = []
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        wanted.append(("CUDAExecutionProvider", cuda_options))
    wanted.append("CPUExecutionProvider")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    return session, list(session.get_providers())


BATCH_PADDING = ("auto", "on", "off")
"""``auto``: pad batch sizes on the CUDA provider only (there every new input shape costs a
cuDNN algorithm search; on a CPU a padded row costs a row's compute and buys nothing)."""


def padded_batch(n: int) -> int:
    """The batch size a padded session runs a batch of ``n`` at: the next power of two (the
    planner's batch sizes are powers of two, so a full batch is never padded)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pads_batches(mode: str, providers: list[str]) -> bool:
    """Whether a session on ``providers`` pads its batches under ``mode`` (BATCH_PADDING)."""
    if mode not in BATCH_PADDING:
        raise ValueError(f"batch padding must be one of {', '.join(BATCH_PADDING)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and bool(providers) and providers[0] == "CUDAExecutionProvider")


class BatchPaddedSession:
    """An ONNX Runtime session whose ``run`` feeds ONNX Runtime only power-of-two batch
    sizes: every input's first (batch) dimension is padded to :func:`padded_batch` by
    repeating its last row (real data: no zeros through a softmax or a division), and every
    output whose first dimension is the padded size is cut back to the real one. A worker
    then meets log2(max batch) + 1 batch sizes per shape bucket instead of every size from 1
    (on a GPU, 6 shapes a bucket at batch 32 instead of 32 cuDNN searches). Everything else
    is passed through to the session."""

    __slots__ = ("_session",)

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, output_names, feeds: dict, *args, **kwargs):
        import numpy as np

        sizes = {len(v) for v in feeds.values() if getattr(v, "ndim", 0) >= 1}
        if len(sizes) != 1:
            return self._session.run(output_names, feeds, *args, **kwargs)
        n = sizes.pop()
        target = padded_batch(n)
        if target == n or n == 0:
            return self._session.run(output_names, feeds, *args, **kwargs)
        padded = {k: np.concatenate([v, np.repeat(v[-1:], target - n, axis=0)]) for k, v in feeds.items()}
        outs = self._session.run(output_names, padded, *args, **kwargs)
        return [o[:n] if getattr(o, "ndim", 0) >= 1 and len(o) == target else o for o in outs]

    def __getattr__(self, name: str):
        return getattr(self._session, name)
