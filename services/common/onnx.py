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
