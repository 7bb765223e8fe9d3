"""Load report arithmetic (numbers shown) and the CLI's parser, without sockets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.loadgen import report as rep
from services.loadgen.main import build_parser, config_from_args, write_json
from services.loadgen.runner import LoadConfig, arrival_window_s, request_budget_ms
from services.loadgen.schedule import Arrival


def R(i, code, latency=None, slo=1.0, cer=None, path=None, version=None):
    return rep.RequestResult(i, code, latency, slo, cer, version, path)


RESULTS = [
    # 6 OK answers: 4 on time, 2 late (latency over the 1 s SLO).
    R(0, "OK", 0.1, cer=0.10, path="det-s/rec-t", version=3),
    R(1, "OK", 0.2, cer=0.20, path="det-s/rec-t", version=3),
    R(2, "OK", 0.3, cer=0.30, path="det-t/rec-t", version=4),
    R(3, "OK", 0.4, path="det-s/rec-t", version=4),     # no truth: no CER
    R(4, "OK", 1.5, cer=0.40, path="det-s/rec-t", version=4),
    R(5, "OK", 2.0, slo=1.9, cer=0.0),                   # late against its own SLO
    R(6, "DEADLINE_EXCEEDED", 1.0),
    R(7, "DEADLINE_EXCEEDED", 1.0),
    R(8, "RESOURCE_EXHAUSTED", 0.01),
    R(9, "INVALID_ARGUMENT", 0.01),
    R(10, "UNAVAILABLE", 0.01),
    R(11, rep.IN_FLIGHT_CAP),
]


def test_summarize_counts_every_outcome_once():
    r = rep.summarize(RESULTS, elapsed_s=4.5, window_s=3.0, max_send_lag_s=0.0125)
    assert (r.sent, r.ok, r.on_time, r.late) == (12, 6, 4, 2)
    assert (r.dropped, r.shed, r.invalid) == (2, 1, 1)
    assert r.errors == {rep.IN_FLIGHT_CAP: 1, "UNAVAILABLE": 1}
    assert r.sent == r.ok + r.dropped + r.shed + r.invalid + r.total_errors  # 6 + 2 + 1 + 1 + 2
    assert r.violations == 8  # 2 late + 2 dropped + 1 shed + 1 invalid + 2 errors
    assert r.slo_violation_ratio == pytest.approx(8 / 12)  # = (12 sent - 4 on time) / 12
    # Rates per second of the 3 s arrival window, not of the 4.5 s until the last outcome.
    assert r.throughput_rps == pytest.approx(2.0)  # 6 OK / 3 s
    assert r.goodput_rps == pytest.approx(4 / 3)   # 4 on time / 3 s
    assert r.offered_rps == pytest.approx(4.0)     # 12 sent / 3 s
    assert (r.window_s, r.elapsed_s) == (3.0, 4.5)
    assert r.max_send_lag_ms == pytest.approx(12.5)


def test_summarize_latency_percentiles_of_ok_answers_only():
    r = rep.summarize(RESULTS, elapsed_s=4.0)
    # OK latencies 0.1 0.2 0.3 0.4 1.5 2.0 s; linear interpolation at rank q/100 * (6 - 1):
    assert r.latency_p50_ms == pytest.approx(350.0)   # rank 2.5: (0.3 + 0.4) / 2
    assert r.latency_p95_ms == pytest.approx(1875.0)  # rank 4.75: 1.5 + 0.75 * (2.0 - 1.5)
    assert r.latency_p99_ms == pytest.approx(1975.0)  # rank 4.95: 1.5 + 0.95 * 0.5


def test_summarize_cer_and_response_parameters():
    r = rep.summarize(RESULTS, elapsed_s=4.0)
    assert r.cer_pages == 5
    assert r.mean_cer == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3 + 0.4 + 0.0) / 5
    assert r.variant_paths == {"det-s/rec-t": 4, "det-t/rec-t": 1}
    assert r.plan_versions == {"3": 2, "4": 3}


def test_rates_fall_back_to_elapsed_when_everything_is_sent_at_once():
    r = rep.summarize(RESULTS, elapsed_s=4.0, window_s=0.0)
    assert r.throughput_rps == pytest.approx(1.5)  # 6 OK / 4 s elapsed


def test_arrival_window():
    poisson = LoadConfig(target="x", rate=1, duration_s=10)
    assert arrival_window_s(poisson, [Arrival(9.7)]) == 10.0
    trace = LoadConfig(target="x", trace=Path("t"))
    assert arrival_window_s(trace, [Arrival(0.5), Arrival(42.0)]) == 42.0
    assert arrival_window_s(trace, []) == 0.0


def test_summarize_empty_run():
    r = rep.summarize([], elapsed_s=0.0)
    assert (r.sent, r.slo_violation_ratio, r.throughput_rps) == (0, 0.0, 0.0)
    assert r.latency_p50_ms is None and r.mean_cer is None
    assert "sent" in rep.format_report(r)


def test_format_report_shows_the_numbers():
    text = rep.format_report(rep.summarize(RESULTS, elapsed_s=4.0, window_s=3.0))
    assert "answered OK" in text and "50.00 %" in text  # 6 of 12
    assert "SLO violation ratio" in text and "0.6667" in text
    assert "error UNAVAILABLE" in text and "error CLIENT_IN_FLIGHT_CAP" in text
    assert "350.0 ms / 1875.0 ms / 1975.0 ms" in text
    assert "0.2000 over 5 pages" in text
    assert "det-s/rec-t" in text and "v3: 2, v4: 3" in text


def test_json_report_round_trips(tmp_path: Path):
    r = rep.summarize(RESULTS, elapsed_s=4.0, config={"rate": 3.0})
    write_json(r, tmp_path / "out" / "r.json")
    doc = json.loads((tmp_path / "out" / "r.json").read_text())
    assert doc["sent"] == 12 and doc["violations"] == 8 and doc["total_errors"] == 2
    assert doc["errors"] == {"CLIENT_IN_FLIGHT_CAP": 1, "UNAVAILABLE": 1}
    assert doc["config"] == {"rate": 3.0}


# --------------------------------------------------------------------------- CLI


def test_parser_poisson_mode_defaults():
    args = build_parser().parse_args(
        ["--target", "h:1", "--pages", "d", "--rate", "5", "--duration", "30"])
    c = config_from_args(args)
    assert (c.target, c.pipeline, c.rate, c.duration_s, c.seed) == ("h:1", "ocr", 5.0, 30.0, 0)
    assert c.slo_ms == 1500.0 and c.timeout_ms is None and c.effective_timeout_ms == 1500.0
    assert c.progress and c.max_in_flight == 10_000
    c.validate()


def test_parser_trace_mode():
    args = build_parser().parse_args(
        ["--pages", "d", "--trace", "t.txt", "--time-scale", "0.1", "--rate-scale", "2",
         "--use-trace-deadlines", "--timeout-ms", "900", "--quiet", "--json", "r.json"])
    c = config_from_args(args)
    assert (c.trace, c.time_scale, c.rate_scale, c.use_trace_deadlines) == (
        Path("t.txt"), 0.1, 2.0, True)
    assert c.effective_timeout_ms == 900.0 and not c.progress
    assert args.json == Path("r.json")


@pytest.mark.parametrize("argv", [
    ["--pages", "d"],                                             # no arrivals
    ["--pages", "d", "--rate", "1", "--trace", "t"],              # both
    ["--pages", "d", "--rate", "0", "--duration", "1"],           # rate must be > 0
    ["--pages", "d", "--rate", "1", "--duration", "1", "--max-in-flight", "0"],
    ["--pages", "d", "--rate", "1", "--duration", "1", "--shape", "square"],   # no peak/period
    ["--pages", "d", "--rate", "1", "--duration", "1", "--shape", "step", "--peak-rate", "2",
     "--step-at-s", "1", "--period-s", "3"],                                  # unused option
    ["--pages", "d", "--trace", "t", "--shape", "diurnal", "--peak-rate", "2", "--period-s", "3"],
    ["--pages", "d", "--rate", "1", "--duration", "1", "--plan-history", "h.json"],  # no source
])
def test_parser_rejects(argv, capsys):
    from services.loadgen.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_main_requires_duration_with_rate(capsys):
    from services.loadgen.main import main

    with pytest.raises(SystemExit):
        main(["--pages", "d", "--rate", "1"])
    assert "--rate needs --duration" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for word in ("open-loop", "SLO violation ratio", "--time-scale", "DEADLINE_EXCEEDED",
                 "pipeserve-make-pages"):
        assert word in out


def test_request_budget():
    poisson = LoadConfig(target="x", rate=1, duration_s=1, slo_ms=1500, timeout_ms=2000)
    assert request_budget_ms(poisson, Arrival(0.0)) == (1500, 2000)
    trace = LoadConfig(target="x", trace=Path("t"), use_trace_deadlines=True)
    assert request_budget_ms(trace, Arrival(0.0, 300.0)) == (300.0, 300.0)
    ignore = LoadConfig(target="x", trace=Path("t"))
    assert request_budget_ms(ignore, Arrival(0.0, 300.0)) == (1500, 1500)


def test_config_validate():
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(target="x").validate()
    with pytest.raises(ValueError, match="needs a duration"):
        LoadConfig(target="x", rate=1.0).validate()


def test_a_request_id_appended_to_a_serialised_request_is_its_id():
    from services.common import oip
    from services.gen import inference_pb2
    from services.loadgen.runner import _string_field

    template = oip.build_image_request("ocr", b"\x89PNG\r\n\x1a\n" + b"x" * 300, timeout_ms=1500)
    for rid in ("lg-0-1", "lg-7-" + "9" * 200):          # a one- and a two-byte length
        wire = template.SerializeToString() + _string_field(3, rid)
        parsed = inference_pb2.ModelInferRequest.FromString(wire)
        expected = inference_pb2.ModelInferRequest()
        expected.CopyFrom(template)
        expected.id = rid
        assert parsed == expected


def test_the_worst_send_lag_covers_what_requests_saw_when_they_went_out():
    # the sending loop measured 2 ms at its worst, but one request left 9 ms late (its task
    # started later): the report's maximum is never below its own 99th percentile
    results = [rep.RequestResult(i, rep.OK, 0.1, 1.0, t_s=i * 0.1, send_lag_s=0.001) for i in range(20)]
    results.append(rep.RequestResult(20, rep.OK, 0.1, 1.0, t_s=2.0, send_lag_s=0.009))
    r = rep.summarize(results, elapsed_s=2.5, window_s=2.0, max_send_lag_s=0.002)
    assert r.max_send_lag_ms == pytest.approx(9.0)
    assert r.max_send_lag_ms >= r.send_lag_p99_ms
