"""The echo processor (services/echo): the bytes through the ONNX Identity model, unchanged,
one ONNX Runtime call per batch, one region (and, forwarding, one child payload) per item."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import parse_spec
from services.echo.model import write_identity_model
from services.echo.processors import digest

SPEC = parse_spec({
    "name": "echo", "slo_ms": 1000, "plugins": ["services.echo.processors"],
    "tasks": [
        {"name": "a", "children": ["b"], "variants": [{"name": "echo_a", "model": "echo/identity.onnx",
                                                       "processor": "echo", "settings": {"forward": True}}]},
        {"name": "b", "variants": [{"name": "echo_b", "model": "echo/identity.onnx", "processor": "echo"}]},
    ]})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    write_identity_model(out / "echo" / "identity.onnx")
    return out


def run(models, variant: str, payloads: list[bytes]):
    proc = make_processor(SPEC.variant(variant), models, SPEC.plugins)
    session, _ = create_session(proc.model_path, prefer_gpu=False)
    calls = []
    real_run = session.run

    class Counting:
        def run(self, *args, **kw):
            calls.append(1)
            return real_run(*args, **kw)

        def get_inputs(self):
            return session.get_inputs()
    return proc.run_batch(Counting(), [proc.prepare(p) for p in payloads]), len(calls)


def test_a_forwarding_stage_echoes_each_item_in_one_onnx_call(models):
    payloads = [b"x", bytes(range(256)) * 3, b"\x00" * 1000]
    results, calls = run(models, "echo_a", payloads)
    assert calls == 1
    assert [r.child_payloads for r in results] == [(p,) for p in payloads]
    assert [[g.text for g in r.regions] for r in results] == [[digest(p)] for p in payloads]
    assert [r.regions[0].score for r in results] == [float(len(p)) for p in payloads]


def test_a_leaf_stage_answers_one_region_and_no_child_payload(models):
    [result], _ = run(models, "echo_b", [b"hello"])
    assert result.child_payloads == ()
    assert [g.text for g in result.regions] == ["5:3610a686"]


def test_an_empty_payload_is_invalid(models):
    proc = make_processor(SPEC.variant("echo_b"), models, SPEC.plugins)
    with pytest.raises(InvalidInput):
        proc.prepare(b"")


def test_the_model_file_is_written_once(tmp_path):
    path = write_identity_model(tmp_path / "m" / "identity.onnx")
    mtime = path.stat().st_mtime_ns
    write_identity_model(path)
    assert path.stat().st_mtime_ns == mtime
