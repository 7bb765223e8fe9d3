"""The OCR tree pipeline's pure parts: pages with turned lines, orientation matching, the
ppocr_cls processor with a fake session, the front door's two-child answer (OIP codec)."""
import json
from pathlib import Path

import numpy as np
import pytest

from services.common import oip
from services.common.errors import InvalidInput
from services.common.processing import make_processor
from services.common.spec import VariantSpec, load_spec
from services.gen import inference_pb2 as ipb
from services.gen import pipeserve_pb2 as pb
from services.ocr.orientation import orientation_accuracy, orientation_hits
from services.ocr.pages import TruthLine, generate_page, load_pages, write_pages
from services.ocr.processors import encode_image
from services.router.frontdoor_results import format_ocr_lines, has_orientation

ROOT = Path(__file__).resolve().parents[2]


# -- pages ---------------------------------------------------------------------------

def test_rotate_fraction_zero_is_the_plain_page():
    assert generate_page(3, 1) == generate_page(3, 1, rotate_fraction=0.0)


def test_turned_lines_keep_layout_and_text_and_record_the_angle():
    plain, turned = generate_page(3, 1), generate_page(3, 1, rotate_fraction=0.5)
    assert [(ln.text, ln.box) for ln in plain.lines] == [(ln.text, ln.box) for ln in turned.lines]
    angles = [ln.angle for ln in turned.lines]
    assert set(angles) == {0, 180} and all(ln.angle == 0 for ln in plain.lines)
    assert turned.png != plain.png
    assert all(ln.angle == 180 for ln in generate_page(3, 1, rotate_fraction=1.0).lines)
    with pytest.raises(ValueError):
        generate_page(3, 1, rotate_fraction=1.5)


def test_angles_round_trip_and_plain_ground_truth_has_no_angle_key(tmp_path):
    write_pages(tmp_path / "plain", 2, seed=4, progress=False)
    doc = json.loads((tmp_path / "plain" / "ground_truth.json").read_text())
    assert "rotate_fraction" not in doc and all("angle" not in ln for p in doc["pages"] for ln in p["lines"])
    written = write_pages(tmp_path / "rot", 2, seed=4, progress=False, rotate_fraction=0.5)
    assert load_pages(tmp_path / "rot") == written
    assert json.loads((tmp_path / "rot" / "ground_truth.json").read_text())["rotate_fraction"] == 0.5


# -- orientation matching --------------------------------------------------------------

def _box(x0, y0, x1, y1):
    return (x0, y0, x1, y0, x1, y1, x0, y1)


def test_orientation_hits_match_by_cover_and_count_misses():
    truth = [TruthLine("a", _box(0, 0, 100, 20), 0), TruthLine("b", _box(0, 50, 100, 70), 180),
             TruthLine("c", _box(200, 0, 300, 20), 180)]
    pred = [("0", _box(-2, -2, 98, 21)),        # covers a: right
            ("0", _box(0, 48, 100, 72)),          # covers b: wrong label
            ("180", _box(280, 0, 400, 20))]       # covers only 20% of c: a miss
    assert orientation_hits(pred, truth) == [True, False, False]
    assert orientation_accuracy(pred, truth) == pytest.approx(1 / 3)
    assert orientation_accuracy([], []) == 1.0


# -- the ppocr_cls processor -----------------------------------------------------------

@pytest.fixture
def cls(tmp_path):
    return make_processor(VariantSpec("c", "cls", "cls.onnx", "ppocr_cls", input_names=("x",), settings={}), tmp_path,
                          ["services.ocr.processors"])


def test_cls_prepare_keeps_aspect_pads_right_and_normalises(cls):
    crop = np.full((30, 60, 3), 255, np.uint8)              # 2:1 -> 96 x 48, padded to 192
    data = cls.prepare(encode_image(crop, "png")).data
    assert data.shape == (3, 48, 192) and data.dtype == np.float32
    assert np.allclose(data[:, :, :96], 1.0) and np.allclose(data[:, :, 96:], 0.0)
    wide = cls.prepare(encode_image(np.zeros((10, 400, 3), np.uint8), "png")).data
    assert wide.shape == (3, 48, 192) and np.allclose(wide, -1.0)   # squeezed, no padding
    with pytest.raises(InvalidInput):
        cls.prepare(b"not an image")


class _Session:
    def __init__(self, out):
        self.out = out

    def run(self, outputs, feeds):
        [batch] = feeds.values()
        assert batch.shape[1:] == (3, 48, 192)
        return [self.out[: len(batch)]]


def test_cls_labels_are_argmax_with_probability_in_order(cls):
    items = [cls.prepare(encode_image(np.zeros((20, 80, 3), np.uint8), "png")) for _ in range(3)]
    out = cls.run_batch(_Session(np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45]], np.float32)), items)
    assert [(r.regions[0].label, r.regions[0].confidence) for r in out] == [("0", 0.9), ("180", 0.8), ("0", 0.55)]
    with pytest.raises(RuntimeError, match="shape"):
        cls.run_batch(_Session(np.zeros((3, 4), np.float32)), items)


# -- the front door's answer -------------------------------------------------------------

def test_tree_spec_has_orientation_and_the_chain_has_not():
    assert has_orientation(load_spec(ROOT / "pipelines" / "ocr_tree.yaml"))
    assert not has_orientation(load_spec(ROOT / "pipelines" / "ocr.yaml"))


def _result():
    regions = [pb.Region(points=list(_box(0, 0, 10, 5))), pb.Region(points=list(_box(0, 9, 10, 14)))]
    rec = [pb.QueryResult(status=pb.OK, regions=[pb.Region(text=t, confidence=0.9)]) for t in ("ab", "cd")]
    cls = [pb.QueryResult(status=pb.OK, regions=[pb.Region(label=l, confidence=0.75)]) for l in ("0", "180")]
    return pb.QueryResult(status=pb.OK, regions=regions, children=rec + cls)


def test_format_ocr_lines_reads_both_children():
    lines = format_ocr_lines(_result(), orientation=True)
    assert [(ln.text, ln.orientation, ln.orientation_confidence) for ln in lines] == [
        ("ab", "0", 0.75), ("cd", "180", 0.75)]
    plain = format_ocr_lines(_result())
    assert [(ln.text, ln.orientation) for ln in plain] == [("ab", None), ("cd", None)]


def test_orientation_outputs_round_trip_and_stay_off_for_the_chain():
    lines = [oip.OcrLine("ab", _box(0, 0, 10, 5), 0.5, "180", 0.75), oip.OcrLine("c", _box(1, 1, 2, 2), 1.0, "0", 1.0)]
    resp = oip.build_ocr_response("ocr_tree", "r", lines, orientation=True)
    assert [o.name for o in resp.outputs] == list(oip.ocr_outputs(True))
    wire = ipb.ModelInferResponse.FromString(resp.SerializeToString())
    assert oip.parse_ocr_response(wire) == lines
    plain = oip.build_ocr_response("ocr", "r", lines)
    assert [o.name for o in plain.outputs] == list(oip.OUTPUTS)
    assert [ln.orientation for ln in oip.parse_ocr_response(plain)] == [None, None]
    meta = oip.model_metadata("ocr_tree", orientation=True)
    assert [o.name for o in meta.outputs] == list(oip.ocr_outputs(True))
    assert [o.name for o in oip.model_config("ocr_tree", orientation=True).output] == list(oip.ocr_outputs(True))


def test_orientation_output_can_be_requested_only_from_the_tree():
    req = ipb.ModelInferRequest(model_name="x")
    req.outputs.add().name = "orientation"
    assert oip.requested_outputs(req, orientation=True) == ("orientation",)
    with pytest.raises(InvalidInput, match="unknown output 'orientation'"):
        oip.requested_outputs(req)


# -- profile, planner, simulator -----------------------------------------------------------

def test_profiler_stores_classifier_paths_beside_the_recognisers():
    from services.tools.profiler import build_profile

    spec = load_spec(ROOT / "pipelines" / "ocr_tree.yaml")
    names = [v.name for t in spec.tasks for v in t.variants]
    measured = {v: {"latency": {1: [10.0, 12.0]}, "providers": ["CPUExecutionProvider"]} for v in names}
    fan = {d: {"rec": 11.0, "cls": 11.0} for d in ("det_v6tiny_320", "det_v6small_640")}
    cer = {("det_v6tiny_320", "rec_v6tiny"): 0.9, ("det_v6tiny_320", "rec_v6small"): 0.92,
           ("det_v6small_640", "rec_v6tiny"): 0.99, ("det_v6small_640", "rec_v6small"): 0.995}
    orient = {("det_v6tiny_320", "cls_mobile_v2"): 0.85, ("det_v6small_640", "cls_mobile_v2"): 0.93}
    p = build_profile(spec, measured, fan, cer, "cpu", "test", orient)
    assert p.path_accuracy["det_v6small_640/cls_mobile_v2"] == 0.93
    assert p.path_accuracy["det_v6tiny_320/cls_mobile_v2"] == 0.85
    assert p.task("cls").variants[0].accuracy == 0.93          # behind the reference detector
    assert p.task("det").fan_out["det_v6tiny_320"] == {"rec": 11.0, "cls": 11.0}


@pytest.mark.parametrize("method", ["relaxed", "exact"])
def test_planner_and_simulator_take_the_measured_tree_profile(method):
    from services.planner.profile import load_profile
    from services.planner.solver import PlannerContext, solve
    from services.planner.verify import check_solution
    from services.sim.arrivals import poisson_arrivals
    from services.sim.engine import SimConfig, simulate
    from services.sim.policies import make_policy

    prof = load_profile(ROOT / "profiles" / "ocr_tree_cpu.json")
    assert [t.name for t in prof.tasks] == ["det", "rec", "cls"] and prof.task("det").children == ("rec", "cls")
    sol = solve(PlannerContext(prof, 12.0, 4, method=method))   # more than full accuracy serves
    assert sol.ok and check_solution(sol, prof) == []
    by_branch: dict = {}
    for f in sol.flows:
        by_branch[(f.tasks[1], f.variants[0])] = by_branch.get((f.tasks[1], f.variants[0]), 0.0) + f.rate_qps
    for d in {k[1] for k in by_branch}:   # both children see the same detector split
        assert by_branch.get(("rec", d), 0) == pytest.approx(by_branch.get(("cls", d), 0), abs=1e-6)
    assert {t for f in sol.flows for t in f.tasks} == {"det", "rec", "cls"}
    r = simulate(prof, poisson_arrivals(3.0, 20.0, 0), make_policy("ours", prof, 4), SimConfig(n_workers=4, seed=0))
    assert r.summary()["ok"] > 0 and r.summary()["violation_ratio"] < 0.05


def test_load_report_gives_orientation_accuracy_beside_cer():
    from services.loadgen import report as rep

    results = [rep.RequestResult(0, rep.OK, 0.2, 1.5, cer=0.1, orientation_acc=0.9),
               rep.RequestResult(1, rep.OK, 0.3, 1.5, cer=0.2, orientation_acc=0.7),
               rep.RequestResult(2, rep.DROPPED, None, 1.5)]
    r = rep.summarize(results, elapsed_s=1.0, window_s=1.0)
    assert r.mean_orientation_acc == pytest.approx(0.8) and r.orientation_pages == 2
    row = next(ln for ln in rep.format_report(r).splitlines() if ln.startswith("line orientation accuracy"))
    assert row.endswith("0.8000 over 2 pages")
    plain = rep.summarize([rep.RequestResult(0, rep.OK, 0.2, 1.5, cer=0.1)], elapsed_s=1.0)
    assert plain.mean_orientation_acc is None and "orientation" not in rep.format_report(plain)
