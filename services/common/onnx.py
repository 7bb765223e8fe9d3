"""ONNX Runtime session creation: CUDA first where present, and an honest record of
which execution providers the session actually got."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def create_session(model_path: str | Path, *, prefer_gpu: bool = True, intra_op_threads: int = 1,
                   device_id: int = 0) -> tuple[Any, list[str]]:
    """Load ``model_path`` and return ``(session, providers_the_session_got)``.

    ``intra_op_threads`` defaults to 1: on a small CPU host several workers share the
    cores, and one thread per session keeps them from fighting over them.
    """
    import onnxruntime as ort

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
        wanted.append(("CUDAExecutionProvider", {"device_id": device_id}))
    wanted.append("CPUExecutionProvider")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    return session, list(session.get_providers())
