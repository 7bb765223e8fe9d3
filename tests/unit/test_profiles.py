"""Profile format: the shipped Loki profiles load, round-trip, and bad fields are named."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from services.common.errors import SpecError
from services.planner.profile import FORMAT, load_profile, parse_profile, profile_to_dict, write_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"


def ocr_like() -> dict:
    """The OCR pipeline in the profile format (numbers from the brief, CPU)."""
    def lin(per_item_ms: float, fixed_ms: float = 0.0) -> dict:
        return {str(b): {"p50_ms": fixed_ms + per_item_ms * b, "p95_ms": (fixed_ms + per_item_ms * b) * 1.2}
                for b in (1, 2, 4, 8)}
    return {
        "format": FORMAT, "name": "ocr", "slo_ms": 1500, "device": "cpu-2core",
        "provenance": "brief section 6 (40 generated pages)",
        "tasks": [
            {"name": "det", "children": ["rec"],
             "variants": [{"name": "det_v6tiny_320", "accuracy": 0.954, "latency_ms": lin(7.5)},
                          {"name": "det_v6small_320", "accuracy": 0.959, "latency_ms": lin(15.0)},
                          {"name": "det_v6small_640", "accuracy": 0.972, "latency_ms": lin(54.0)}],
             "fan_out": {"det_v6tiny_320": {"rec": 10.5}, "det_v6small_320": {"rec": 10.8},
                         "det_v6small_640": {"rec": 11.0}}},
            {"name": "rec", "children": [],
             "variants": [{"name": "rec_v6tiny", "accuracy": 0.97, "latency_ms": lin(1.2, 0.3)},
                          {"name": "rec_v6small", "accuracy": 0.99, "latency_ms": lin(6.0, 0.5)},
                          {"name": "rec_v5", "accuracy": 0.96, "latency_ms": lin(7.0, 0.5)},
                          {"name": "rec_v4", "accuracy": 0.95, "latency_ms": lin(8.0, 0.5)}]},
        ],
    }


@pytest.mark.parametrize("name", ["traffic_analysis", "social_media"])
def test_shipped_profiles_load_and_keep_provenance(name, tmp_path):
    p = load_profile(PROFILES / f"{name}.json")
    raw = json.loads((PROFILES / f"{name}.json").read_text())
    assert p.provenance.startswith("Loki artifact") and raw["provenance"] == p.provenance
    assert p.device == "GTX 1080 Ti"
    assert len(p.chains()) == 2   # both are trees with two branches
    write_profile(p, tmp_path / "again.json")
    q = load_profile(tmp_path / "again.json")
    assert profile_to_dict(q) == profile_to_dict(p)


def test_traffic_analysis_shape():
    p = load_profile(PROFILES / "traffic_analysis.json")
    det = p.task("object_detection")
    assert det.children == ("car_classification", "facial_recognition")
    assert det.fan_out["yolov5x"]["car_classification"] == pytest.approx(17.8151)
    assert det.variant("yolov5x").latency(1) == pytest.approx(42.6732)           # p95 by default
    assert det.variant("yolov5x").latency(1, "p50") == pytest.approx(40.8351)
    assert det.variant("yolov5x").throughput_qps(2) == pytest.approx(2 * 1000 / 73.2837, rel=1e-3)


def test_ocr_profile_roundtrip(tmp_path):
    p = parse_profile(ocr_like(), "ocr")
    assert p.chains() == [("det", "rec")]
    write_profile(p, tmp_path / "ocr.json")
    assert load_profile(tmp_path / "ocr.json").task("rec").variant("rec_v4").accuracy == 0.95


def _broken(mutate) -> str:
    d = copy.deepcopy(ocr_like())
    mutate(d)
    with pytest.raises(SpecError) as e:
        parse_profile(d, "x.json")
    return e.value.field


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["tasks"][0]["variants"][0].pop("accuracy"), "tasks[0].variants[0].accuracy"),
    (lambda d: d["tasks"][0]["variants"][1].__setitem__("accuracy", 1.5), "tasks[0].variants[1].accuracy"),
    (lambda d: d["tasks"][1]["variants"][0]["latency_ms"]["2"].__setitem__("p95_ms", 0.1),
     "tasks[1].variants[0].latency_ms.2.p95_ms"),
    (lambda d: d["tasks"][1]["variants"][0]["latency_ms"].__setitem__("two", {"p50_ms": 1, "p95_ms": 2}),
     "tasks[1].variants[0].latency_ms.two"),
    (lambda d: d["tasks"][0]["fan_out"].pop("det_v6tiny_320"), "tasks[0].fan_out.det_v6tiny_320.rec"),
    (lambda d: d["tasks"][0]["fan_out"]["det_v6tiny_320"].__setitem__("nope", 1.0),
     "tasks[0].fan_out.det_v6tiny_320.nope"),
    (lambda d: d["tasks"][0].__setitem__("children", ["ghost"]), "tasks[0].fan_out.det_v6tiny_320.rec"),
    (lambda d: d.__setitem__("slo_ms", -1), "slo_ms"),
    (lambda d: d.__setitem__("format", "other/2"), "format"),
    (lambda d: d.__setitem__("colour", "red"), "colour"),
    (lambda d: d["tasks"][1]["variants"][1].__setitem__("name", "rec_v6tiny"), "tasks[1].variants[1].name"),
])
def test_errors_name_the_field(mutate, field):
    assert _broken(mutate) == field


def test_missing_file_names_it(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_profile(tmp_path / "nope.json")


def test_sharing_table_round_trips(tmp_path):
    d = ocr_like()
    d["sharing"] = {"cpu-2core": {"1": 1.0, "2": 1.12, "4": 2.05}}
    p = parse_profile(d, "ocr")
    assert p.sharing == {"cpu-2core": {1: 1.0, 2: 1.12, 4: 2.05}}
    write_profile(p, tmp_path / "ocr.json")
    q = load_profile(tmp_path / "ocr.json")
    assert q.sharing == p.sharing
    assert json.loads((tmp_path / "ocr.json").read_text())["sharing"] == d["sharing"]


def test_no_sharing_table_writes_none(tmp_path):
    """Absent means no contention modelled, and a profile without one is written as before."""
    p = parse_profile(ocr_like(), "ocr")
    assert p.sharing == {}
    assert "sharing" not in profile_to_dict(p)


@pytest.mark.parametrize("sharing, field", [
    ([1.0, 1.2], "sharing"),
    ({"cpu": {}}, "sharing.cpu"),
    ({"cpu": {"0": 1.0}}, "sharing.cpu.0"),
    ({"cpu": {"two": 1.3}}, "sharing.cpu.two"),
    ({"cpu": {"2": -1.0}}, "sharing.cpu.2"),
    ({"cpu": {"2": "fast"}}, "sharing.cpu.2"),
    ({"cpu": {"1": 1.3, "2": 1.5}}, "sharing.cpu.1"),
])
def test_sharing_errors_name_the_field(sharing, field):
    assert _broken(lambda d: d.__setitem__("sharing", sharing)) == field
