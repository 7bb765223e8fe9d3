from pathlib import Path

import pytest

from services.common.errors import SpecError
from services.common.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def minimal():
    return {
        "name": "p", "slo_ms": 500,
        "tasks": [
            {"name": "a", "children": ["b"], "variants": [{"name": "a1", "model": "a.onnx", "processor": "k"}]},
            {"name": "b", "variants": [{"name": "b1", "model": "b.onnx", "processor": "k", "accuracy": 0.9}]},
        ],
    }


def test_the_ocr_spec_loads():
    spec = load_spec(ROOT / "pipelines" / "ocr.yaml")
    assert spec.name == "ocr" and spec.root.name == "det" and spec.root.children == ("rec",)
    assert spec.parent_of("rec") == "det"
    assert {"det_v6small_480", "rec_v6tiny"} <= {v.name for t in spec.tasks for v in t.variants}
    assert spec.variant("det_v6small_480").settings["side"] == 480


def test_minimal_spec_parses():
    spec = parse_spec(minimal())
    assert spec.task("b").variant("b1").accuracy == 0.9
    assert spec.task_names() == ["a", "b"]


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("slo_ms"), "slo_ms"),
    (lambda d: d.update(slo_ms=-1), "slo_ms"),
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d["tasks"][0]["variants"][0].pop("model"), "tasks[0].variants[0].model"),
    (lambda d: d["tasks"][1]["variants"][0].update(accuracy=2), "tasks[1].variants[0].accuracy"),
    (lambda d: d["tasks"][0].update(children=["zzz"]), "tasks[0].children"),
    (lambda d: d["tasks"][1]["variants"][0].update(name="a1"), "tasks[1].variants[0].name"),
    (lambda d: d["tasks"][1].update(name="a"), "tasks[1].name"),
    (lambda d: d["tasks"][0].update(variants=[]), "tasks[0].variants"),
    (lambda d: d.update(output="html"), "output"),
    (lambda d: d["tasks"][0]["variants"][0].update(name="has space"), "tasks[0].variants[0].name"),
])
def test_invalid_specs_name_the_field(mutate, field):
    d = minimal()
    mutate(d)
    with pytest.raises(SpecError) as err:
        parse_spec(d, source="x.yaml")
    assert err.value.field == field
    assert f"field '{field}'" in str(err.value) and str(err.value).startswith("x.yaml")


def test_only_one_root_and_no_orphans():
    d = minimal()
    d["tasks"].append({"name": "c", "variants": [{"name": "c1", "model": "c", "processor": "k"}]})
    with pytest.raises(SpecError, match="only root"):
        parse_spec(d)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="cannot be parsed"):
        load_spec(bad)
