"""The router's command line: the front door's answer margin (--answer-margin-ms)."""
import pytest

from services.router.main import parse_config

BASE = ["--spec", "pipelines/ocr.yaml", "--task", "det", "--redis-url", "redis://127.0.0.1:1"]


def test_the_answer_margin_defaults_to_the_servicers_and_can_be_set():
    assert parse_config(BASE).answer_margin_ms is None   # FrontDoorServicer's default (50 ms)
    assert parse_config(BASE + ["--answer-margin-ms", "80"]).answer_margin_ms == 80.0
    assert parse_config(BASE + ["--answer-margin-ms", "0"]).answer_margin_ms == 0.0


def test_a_negative_answer_margin_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(BASE + ["--answer-margin-ms", "-5"])
    assert exc.value.code == 2
    assert "--answer-margin-ms must be >= 0" in capsys.readouterr().err
