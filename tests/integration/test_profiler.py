"""The profiler on the real OCR models: 2 pages, one detector and one recogniser, small
batches. Needs ``models/`` (``make models``); fails, does not skip, without it.

Also its pure parts (statistics, the accuracy factorisation, profile assembly, and the
planner's use of measured path accuracies in dominance pruning), kept here because a
second ``test_profiler.py`` under tests/unit would clash with this module's name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.common.spec import PipelineSpec, TaskSpec, VariantSpec
from services.ocr.pages import load_pages, write_pages
from services.planner.model import dominated_variants
from services.planner.profile import load_profile, parse_profile, profile_to_dict
from services.tools.profiler import ProfilerConfig, build_profile, factorise, latency_point, run

ROOT = Path(__file__).resolve().parents[2]
MODELS, SPEC = ROOT / "models", ROOT / "pipelines" / "ocr.yaml"

DET, REC = "det_v6tiny_320", "rec_v6tiny"


@pytest.fixture(scope="module")
def two_pages(tmp_path_factory):
    if not (MODELS / "ppocrv6" / "tiny" / "det" / "det.onnx").is_file():
        pytest.fail(f"{MODELS} has no PP-OCRv6 tiny models: run `make models` (pipeserve-fetch-models) first",
                    pytrace=False)
    out = tmp_path_factory.mktemp("pages")
    write_pages(out, 2, seed=7, progress=False)
    return out


def config(pages, out, **kw) -> ProfilerConfig:
    base = dict(spec=SPEC, models=MODELS, pages=pages, out=out, n_pages=2, variants=(DET, REC),
                batches=(("det", (1, 2)), ("rec", (1, 4))), repeats=3, warmup=1, progress=False)
    return ProfilerConfig(**{**base, **kw})


def test_profile_of_two_variants_loads_and_is_sane(two_pages, tmp_path):
    out = tmp_path / "ocr.json"
    run(config(two_pages, out), log=lambda s: None)
    p = load_profile(out)

    assert [t.name for t in p.tasks] == ["det", "rec"]
    det, rec = p.task("det").variant(DET), p.task("rec").variant(REC)
    assert sorted(det.latency_ms) == [1, 2] and sorted(rec.latency_ms) == [1, 4]
    for v in (det, rec):
        assert v.providers and v.providers[-1] == "CPUExecutionProvider"
        assert all(0 < x.p50_ms <= x.p95_ms for x in v.latency_ms.values())
        assert 0.0 <= v.accuracy <= 1.0
    # a batch of 4 crops costs more than one crop, and less than 4 separate ones would plus slack
    assert rec.latency(4, "p50") > rec.latency(1, "p50")
    assert det.latency(2, "p50") > det.latency(1, "p50")

    # fan-out = mean boxes per page; the pages carry ~11 lines each
    truth = np.mean([len(pg.lines) for pg in load_pages(two_pages)])
    assert abs(p.task("det").fan_out[DET]["rec"] - truth) <= 4, (p.task("det").fan_out, truth)

    # one measured pair: it is the reference, so the product of variant accuracies is exact
    assert set(p.path_accuracy) == {f"{DET}/{REC}"}
    assert det.accuracy == pytest.approx(1.0)   # A(d, r*) / A(d*, r*) with d = d*
    assert rec.accuracy * det.accuracy == pytest.approx(p.path_accuracy[f"{DET}/{REC}"], abs=1e-5)
    assert p.path_accuracy[f"{DET}/{REC}"] > 0.5   # 1 - CER: the tiny path reads most text
    assert "CPU" in p.device and "prepare" in p.provenance


def test_rerun_reuses_the_cache(two_pages, tmp_path):
    out = tmp_path / "ocr.json"
    run(config(two_pages, out), log=lambda s: None)
    cache = json.loads((tmp_path / "ocr.json.cache.json").read_text())["entries"]
    assert len(cache) == 1 + 1 + 2 + 2   # fan-out, one CER pair, 2 det batch sizes, 2 rec batch sizes
    first = out.read_text()
    out.unlink()
    run(config(two_pages, out), log=lambda s: None)   # everything cached: same numbers
    assert json.loads(out.read_text())["tasks"] == json.loads(first)["tasks"]
    # another repeat count is another measurement; the accuracy points stay valid
    run(config(two_pages, out, repeats=2), log=lambda s: None)
    entries = json.loads((tmp_path / "ocr.json.cache.json").read_text())["entries"]
    assert len(entries) == len(cache) + 4


def test_committed_ocr_profile_covers_the_spec_and_plans():
    """profiles/ocr_cpu.json (made by the profiler, see docs/planner.md) has every variant of
    pipelines/ocr.yaml, every (det, rec) path measured, and the planner solves on it."""
    from services.common.spec import load_spec
    from services.planner import PlannerContext, solve

    p = load_profile(ROOT / "profiles" / "ocr_cpu.json")
    spec = load_spec(SPEC)
    for t in spec.tasks:
        assert [v.name for v in p.task(t.name).variants] == [v.name for v in t.variants]
    assert len(p.path_accuracy) == len(spec.task("det").variants) * len(spec.task("rec").variants)
    assert all(v.providers for t in p.tasks for v in t.variants)
    sol = solve(PlannerContext(p, demand_qps=2.0, n_workers=2, method="exact"))
    # served to within the planner's documented relative slack (EPS = 1e-6) and float noise
    assert sol.ok and sol.served_qps == pytest.approx(2.0, rel=1.5e-6)


def test_latency_point_interpolates():
    p = latency_point([10.0, 11.0, 12.0, 13.0, 30.0])
    assert p.p50_ms == 12.0
    assert p.p95_ms == pytest.approx(26.6)   # 13 + 0.8 * (30 - 13)


def test_factorise_is_exact_on_the_reference_row_and_column():
    acc = {("d1", "r1"): 0.99, ("d1", "r2"): 0.90, ("d2", "r1"): 0.95, ("d2", "r2"): 0.85}
    a_det, a_rec = factorise(acc)
    assert a_rec == {"r1": 0.99, "r2": 0.90}                        # behind d* = d1
    assert a_det == pytest.approx({"d1": 1.0, "d2": 0.95 / 0.99})    # relative to d*, read by r* = r1
    assert a_det["d2"] * a_rec["r2"] == pytest.approx(0.8636, abs=1e-4)   # vs measured 0.85


def _spec() -> PipelineSpec:
    v = lambda name, task, proc: VariantSpec(name, task, f"{name}.onnx", proc)  # noqa: E731
    return PipelineSpec("ocr", 1500.0, (
        TaskSpec("det", (v("d1", "det", "ppocr_det"), v("d2", "det", "ppocr_det")), ("rec",)),
        TaskSpec("rec", (v("r1", "rec", "ppocr_rec"), v("r2", "rec", "ppocr_rec")))))


def test_build_profile_round_trips_with_providers_and_paths():
    lat = {1: [10.0, 11.0, 12.0], 2: [18.0, 19.0, 25.0]}
    measured = {n: {"latency": lat, "providers": ["CPUExecutionProvider"]} for n in ("d1", "d2", "r1", "r2")}
    acc = {("d1", "r1"): 0.99, ("d1", "r2"): 0.90, ("d2", "r1"): 0.95, ("d2", "r2"): 0.85}
    p = build_profile(_spec(), measured, {"d1": {"rec": 11.0}, "d2": {"rec": 10.5}}, acc, "cpu", "test")
    q = parse_profile(profile_to_dict(p))
    assert q.task("rec").variant("r2").providers == ("CPUExecutionProvider",)
    assert q.task("det").fan_out["d2"]["rec"] == 10.5
    assert q.path_accuracy_of(("d2", "r2")) == 0.85               # measured, not the product 0.8636
    assert q.task("det").variant("d1").latency(2) == pytest.approx(24.4)   # 19 + 0.9 * (25 - 19)


def _two_recs(measured: dict[str, float]) -> dict:
    lat = lambda ms: {"1": {"p50_ms": ms, "p95_ms": ms}}  # noqa: E731
    return {"name": "x", "slo_ms": 1000, "tasks": [
        {"name": "det", "children": ["rec"], "variants": [{"name": "d1", "accuracy": 1.0, "latency_ms": lat(10)}],
         "fan_out": {"d1": {"rec": 1.0}}},
        {"name": "rec", "variants": [{"name": "fast", "accuracy": 0.95, "latency_ms": lat(5)},
                                     {"name": "slow", "accuracy": 0.90, "latency_ms": lat(20)}]}],
        "path_accuracy": measured}


def test_dominance_respects_measured_path_accuracy():
    # by variant accuracy alone, "slow" is dominated by "fast" (less accurate, slower)
    assert dominated_variants(parse_profile(_two_recs({})), 500, "p95") == {"slow"}
    # measured behind d1, "slow" reads better: the planner must keep it
    better = parse_profile(_two_recs({"d1/fast": 0.93, "d1/slow": 0.97}))
    assert dominated_variants(better, 500, "p95") == set()
    worse = parse_profile(_two_recs({"d1/fast": 0.97, "d1/slow": 0.93}))
    assert dominated_variants(worse, 500, "p95") == {"slow"}


def test_tree_profile_measures_the_orientation_classifier(two_pages, tmp_path):
    """pipelines/ocr_tree.yaml: det -> (rec, cls); cls latency on the same crops, its fan-out
    equal to rec's, and path_accuracy["det/cls"] = orientation accuracy on turned pages."""
    turned = tmp_path / "rot"
    write_pages(turned, 2, seed=7, progress=False, rotate_fraction=0.5)
    out = tmp_path / "tree.json"
    run(config(two_pages, out, spec=ROOT / "pipelines" / "ocr_tree.yaml", variants=(DET, REC, "cls_mobile_v2"),
               batches=(("det", (1,)), ("rec", (1,)), ("cls", (1, 4))), orient_pages=turned), log=lambda s: None)
    p = load_profile(out)
    assert p.task("det").children == ("rec", "cls")
    fan = p.task("det").fan_out[DET]
    assert fan["cls"] == fan["rec"] > 5
    cls = p.task("cls").variant("cls_mobile_v2")
    assert sorted(cls.latency_ms) == [1, 4] and cls.latency(4, "p50") > cls.latency(1, "p50")
    # 0.667 on these 2 pages (27 lines, 13 turned) with det_v6tiny_320, which loses lines
    # (bench/bench_ocr_orientation.py on the same pages); the classifier alone: 0.963
    assert 0.5 <= p.path_accuracy[f"{DET}/cls_mobile_v2"] == cls.accuracy <= 1.0
    with pytest.raises(SystemExit, match="no turned lines"):
        run(config(two_pages, tmp_path / "x.json", spec=ROOT / "pipelines" / "ocr_tree.yaml",
                   variants=(DET, REC, "cls_mobile_v2"), orient_pages=two_pages), log=lambda s: None)
