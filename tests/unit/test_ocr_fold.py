"""Folding the normalisation into a model (services/ocr/fold.py), on a tiny Identity graph
whose output is exactly what the folded prefix feeds the original network, and the check
that decides whether a processor may use a folded model (services/ocr/images.py)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.common.processing import make_processor
from services.common.spec import VariantSpec
from services.ocr.fold import FOLDS, FoldSpec, fold_models, fold_normalisation, write_folded
from services.ocr.images import VALID_INPUT, folded_model, folded_paths


def _identity(path, channels=3, opset=14):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("opset", [11, 14])   # the models' opsets: cls/rec v6 11, det/rec v5-v6 14
def test_folded_prefix_normalises_and_pads_outside_each_items_valid_region(tmp_path, opset):
    fold = FoldSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pad=-3.0)
    src = _identity(tmp_path / "m.onnx", opset=opset)
    dst = write_folded(src, fold)
    assert dst.name == "m.u8.onnx"
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("x", "tensor(uint8)"), (VALID_INPUT, "tensor(int64)")]
    x = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    valid = np.array([[5, 7], [3, 4]], np.int64)
    (y,) = sess.run(None, {"x": x, VALID_INPUT: valid})
    want = ((x.astype(np.float32) / 255 - np.array(fold.mean, np.float32)) / np.array(fold.std, np.float32))
    want = want.transpose(0, 3, 1, 2).copy()
    want[1, :, 3:, :] = -3.0      # rows 3.. of item 1
    want[1, :, :, 4:] = -3.0      # columns 4.. of item 1
    assert y.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)


def test_fold_refuses_a_model_that_does_not_take_an_image(tmp_path):
    src = _identity(tmp_path / "m.onnx", channels=1)
    with pytest.raises(ValueError, match="is not float32 N x 3 x H x W"):
        fold_normalisation(src, tmp_path / "out.onnx", FoldSpec((0.5,) * 3, (0.5,) * 3))


def test_fold_models_writes_missing_or_stale_twins_only(tmp_path):
    rel = next(iter(FOLDS))
    src = _identity(tmp_path / rel)
    assert fold_models(tmp_path, log=lambda s: None) == [rel.replace(".onnx", ".u8.onnx")]
    assert fold_models(tmp_path, log=lambda s: None) == []          # up to date: nothing to do
    _, record = folded_paths(src)
    stale = json.loads(record.read_text())
    record.write_text(json.dumps({**stale, "source_bytes": 1}))     # made from another source
    assert fold_models(tmp_path, log=lambda s: None) == [rel.replace(".onnx", ".u8.onnx")]
    record.write_text(json.dumps({**stale, "fold_version": 0}))     # by an older prefix graph
    assert fold_models(tmp_path, log=lambda s: None) == [rel.replace(".onnx", ".u8.onnx")]


def test_processors_prepare_uint8_pixels_for_a_folded_model_and_floats_without(tmp_path):
    src = _identity(tmp_path / "rec.onnx")
    (tmp_path / "dict.txt").write_text("a\nb\n")
    v = VariantSpec("r", "rec", "rec.onnx", "ppocr_rec", settings={"dict": "dict.txt"})
    crop = np.full((24, 60, 3), 200, np.uint8)
    plain = make_processor(v, tmp_path, ["services.ocr.processors"])
    assert plain.folded is None and plain.prepare_image(crop).data.dtype == np.float32
    write_folded(src, FoldSpec((0.5,) * 3, (0.5,) * 3))
    rec = make_processor(v, tmp_path, ["services.ocr.processors"])
    assert rec.model_path == tmp_path / "rec.u8.onnx"
    prep = rec.prepare_image(crop)
    assert prep.data.dtype == np.uint8 and prep.data.shape == (48, 160, 3)   # 60 * 48/24 = 120 -> bucket 160
    assert prep.meta["width"] == 120 and not prep.data[:, 120:].any()
    off = make_processor(VariantSpec("r", "rec", "rec.onnx", "ppocr_rec",
                                     settings={"dict": "dict.txt", "fold_normalisation": False}),
                         tmp_path, ["services.ocr.processors"])
    assert off.folded is None and off.model_path == tmp_path / "rec.onnx"


def _folded_files(tmp_path, **record):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 10)
    path, rec = folded_paths(model)
    path.write_bytes(b"folded")
    rec.write_text(json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "pad": 0.0, "layout": "NHWC",
                               "valid_input": "pipeserve_valid", "source_bytes": 10, **record}))
    return model


@pytest.mark.parametrize("record,args,reason", [
    ({}, ((0.5,) * 3, (0.5,) * 3, 0.0), None),
    ({"source_bytes": 11}, ((0.5,) * 3, (0.5,) * 3, 0.0), "made from a 11-byte m.onnx, which is now 10"),
    ({}, ((0.485, 0.456, 0.406), (0.5,) * 3, 0.0), "folds mean"),
    ({}, ((0.5,) * 3, (0.5,) * 3, -1.0), "folds mean"),
    ({"layout": "NCHW"}, ((0.5,) * 3, (0.5,) * 3, 0.0), "takes NCHW"),
    ({"mean": "nope"}, ((0.5,) * 3, (0.5,) * 3, 0.0), "unreadable"),
])
def test_folded_model_is_used_only_when_it_folds_the_variants_constants(tmp_path, record, args, reason):
    model = _folded_files(tmp_path, **record)
    path, why = folded_model(model, *args)
    if reason is None:
        assert path == tmp_path / "m.u8.onnx"
    else:
        assert path is None and reason in why


def test_no_folded_file_means_the_float_path(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    path, why = folded_model(tmp_path / "m.onnx", (0.5,) * 3, (0.5,) * 3, 0.0)
    assert path is None and "no m.u8.onnx" in why
