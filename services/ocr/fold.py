"""Fold the OCR models' input normalisation into the models (``make models`` time only).

The processors normalise each image on the CPU: float32 ``(x/255 - mean)/std``, HWC to
CHW, padding set to a constant after normalisation. On a GPU host that CPU work sets the
pace (docs/gpu.md), so next to each model ``<name>.onnx`` this writes ``<name>.u8.onnx``
that takes what the processor has before that step and does the rest in the graph:

- input ``x`` (the original input's name): uint8 ``N x H x W x C``, the resized BGR pixels,
  padded with anything (zeros);
- input :data:`VALID_INPUT`: int64 ``N x 2``, each item's valid rows and columns (from the
  top left);
- Cast to float32, Transpose to NCHW, ``x * 1/(255 std) - mean/std``, and
  :data:`FoldSpec.pad` outside the valid rows and columns (exactly what the CPU path pads
  with: no uint8 value normalises to the mean colour or to 0.0), then the original graph.

Beside it ``<name>.u8.json`` records the constants folded in and the source's size;
:func:`services.ocr.images.folded_model` reads it at run time, so the worker never imports
``onnx`` (a dev dependency). The constants come from :data:`FOLDS`, which follows the
settings of ``pipelines/ocr.yaml``; a variant whose settings differ uses the float path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.ocr.images import FOLD_LAYOUT, IMAGENET_MEAN, IMAGENET_STD, VALID_INPUT, folded_paths

HALF = (0.5, 0.5, 0.5)
FOLD_VERSION = 1   # raise it when the prefix graph changes: make models then rewrites every twin


@dataclass(frozen=True)
class FoldSpec:
    """The normalisation a model's processor applies: ``(x/255 - mean)/std`` per channel,
    ``pad`` (after normalisation) outside each item's valid region."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: float = 0.0


# model file (under models/) -> what its processor does (pipelines/ocr.yaml's settings)
FOLDS: dict[str, FoldSpec] = {
    "ppocrv6/tiny/det/det.onnx": FoldSpec(IMAGENET_MEAN, IMAGENET_STD),
    "ppocrv6/small/det/det.onnx": FoldSpec(IMAGENET_MEAN, IMAGENET_STD),
    "ppocrv5/det/det.onnx": FoldSpec(IMAGENET_MEAN, IMAGENET_STD),
    "ppocrv4/det/det.onnx": FoldSpec(HALF, HALF),   # det_v4_640 sets mean/std 0.5
    "ppocrv6/tiny/rec/rec.onnx": FoldSpec(HALF, HALF),
    "ppocrv6/small/rec/rec.onnx": FoldSpec(HALF, HALF),
    "ppocrv5/rec/rec.onnx": FoldSpec(HALF, HALF),
    "ppocrv4/rec/rec.onnx": FoldSpec(HALF, HALF),
    "ppocr_mobile_v2/cls/cls.onnx": FoldSpec(HALF, HALF),
}


def fold_normalisation(src: Path, dst: Path, fold: FoldSpec) -> None:
    """Write ``dst``: ``src`` behind a uint8 NHWC input and the normalisation of ``fold``
    (module docstring). Raises ValueError for a model whose single image input is not
    ``N x 3 x H x W`` float32."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{src}: expected one image input, found {[i.name for i in inputs]}")
    x = inputs[0]
    dims = x.type.tensor_type.shape.dim
    if x.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1].dim_value != 3:
        raise ValueError(f"{src}: input {x.name} is not float32 N x 3 x H x W")
    name, p = x.name, "pipeserve_fold_"
    if any(n.startswith(p) for n in [*inits, *(o for node in graph.node for o in node.output)]):
        raise ValueError(f"{src} already holds names starting with {p!r}: folded twice?")

    mean, std = np.asarray(fold.mean, np.float32), np.asarray(fold.std, np.float32)
    consts = {
        "scale": (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32),
        "bias": (-mean / std).reshape(1, 3, 1, 1).astype(np.float32),
        "pad": np.array(fold.pad, np.float32),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
        "rows_shape": np.array([1, 1, -1, 1], np.int64), "cols_shape": np.array([1, 1, 1, -1], np.int64),
        "item_shape": np.array([-1, 1, 1, 1], np.int64),
    }
    new_inits = [numpy_helper.from_array(v, p + k) for k, v in consts.items()]
    n = helper.make_node
    prefix = [
        n("Cast", [name], [p + "f"], to=TensorProto.FLOAT),
        n("Transpose", [p + "f"], [p + "chw"], perm=[0, 3, 1, 2]),
        n("Mul", [p + "chw", p + "scale"], [p + "scaled"]),
        n("Add", [p + "scaled", p + "bias"], [p + "norm"]),
        # valid-region mask: rows < valid[:, 0] and cols < valid[:, 1]
        n("Shape", [name], [p + "shape"]),
        n("Gather", [p + "shape", p + "i1"], [p + "h"], axis=0),
        n("Gather", [p + "shape", p + "i2"], [p + "w"], axis=0),
        n("Range", [p + "i0", p + "h", p + "i1"], [p + "rows"]),
        n("Range", [p + "i0", p + "w", p + "i1"], [p + "cols"]),
        n("Reshape", [p + "rows", p + "rows_shape"], [p + "rows4"]),
        n("Reshape", [p + "cols", p + "cols_shape"], [p + "cols4"]),
        n("Gather", [VALID_INPUT, p + "i0"], [p + "vh"], axis=1),
        n("Gather", [VALID_INPUT, p + "i1"], [p + "vw"], axis=1),
        n("Reshape", [p + "vh", p + "item_shape"], [p + "vh4"]),
        n("Reshape", [p + "vw", p + "item_shape"], [p + "vw4"]),
        n("Less", [p + "rows4", p + "vh4"], [p + "in_rows"]),
        n("Less", [p + "cols4", p + "vw4"], [p + "in_cols"]),
        n("And", [p + "in_rows", p + "in_cols"], [p + "valid"]),
        n("Where", [p + "valid", p + "norm", p + "pad"], [p + "x"]),
    ]
    batch = dims[0].dim_param or "N"
    u8 = helper.make_tensor_value_info(name, TensorProto.UINT8, [batch, "H", "W", 3])
    valid = helper.make_tensor_value_info(VALID_INPUT, TensorProto.INT64, [batch, 2])
    # the uint8 input keeps the original input's name (the spec's input_names stay true for
    # both files); the original graph reads the prefix's output instead
    for node in graph.node:
        node.input[:] = [p + "x" if i == name else i for i in node.input]
    others = [i for i in graph.input if i.name != name]
    del graph.input[:]
    graph.input.extend([u8, valid, *others])
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(prefix + nodes)
    graph.initializer.extend(new_inits)
    onnx.checker.check_model(model)
    tmp = dst.with_suffix(".part")
    onnx.save(model, str(tmp))
    tmp.replace(dst)


def _record(fold: FoldSpec, src: Path) -> dict:
    return {"mean": list(fold.mean), "std": list(fold.std), "pad": fold.pad, "layout": FOLD_LAYOUT,
            "valid_input": VALID_INPUT, "source_bytes": src.stat().st_size, "fold_version": FOLD_VERSION}


def write_folded(src: Path, fold: FoldSpec) -> Path:
    """Write ``src``'s folded model and its record (what :func:`folded_model` checks) beside
    it; return the folded model's path."""
    dst, record = folded_paths(src)
    fold_normalisation(src, dst, fold)
    record.write_text(json.dumps(_record(fold, src)) + "\n")
    return dst


def fold_models(models: Path, log: Callable[[str], None] = print) -> list[str]:
    """Write the folded model and its record for each present model of :data:`FOLDS`
    whose folded file is missing or stale (its record differs: another source size,
    constants or :data:`FOLD_VERSION`); return
    the folded files written. Without the ``onnx`` package, say so and write nothing: the
    processors then normalise on the CPU."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        log("onnx is not installed (the dev extra): no folded uint8 models; the OCR processors "
            "will normalise on the CPU")
        return []
    written = []
    for rel, fold in FOLDS.items():
        src = models / rel
        if not src.is_file():
            continue
        dst, record = folded_paths(src)
        if dst.is_file() and record.is_file() and json.loads(record.read_text()) == _record(fold, src):
            continue
        write_folded(src, fold)
        written.append(str(dst.relative_to(models)))
        log(f"  wrote {dst} (uint8 input, normalisation folded in)")
    return written
