"""The router's command line: the front door's HTTP/2 window probing flag."""
import pytest

from services.common.grpc_utils import SERVER_OPTIONS, server_options
from services.router.main import parse_config

BASE = ["--spec", "pipelines/ocr.yaml", "--task", "det", "--redis-url", "redis://127.0.0.1:1"]


def test_the_front_door_does_not_probe_http2_windows_unless_asked():
    assert parse_config(BASE).bdp_probe is False
    assert parse_config(BASE + ["--http2-bdp-probe", "on"]).bdp_probe is True
    assert parse_config(BASE + ["--http2-bdp-probe", "off"]).bdp_probe is False


def test_an_unknown_probe_setting_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(BASE + ["--http2-bdp-probe", "maybe"])
    assert exc.value.code == 2
    assert "--http2-bdp-probe" in capsys.readouterr().err


def test_server_options_turn_probing_off_and_lower_the_message_limit_only_when_asked():
    assert server_options() == SERVER_OPTIONS
    opts = dict(server_options(1024, bdp_probe=False))
    assert opts["grpc.http2.bdp_probe"] == 0 and opts["grpc.max_receive_message_length"] == 1024
    assert "grpc.http2.bdp_probe" not in dict(server_options(1024, bdp_probe=True))
