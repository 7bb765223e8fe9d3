"""The load generator against a small real grpc.aio OIP server on port 0.

The fake front door answers by request number (the loadgen's ids are ``lg-<seed>-<i>``):
OK, late OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT, UNAVAILABLE, or no
answer at all (the client's deadline fires). The loadgen's counts must match exactly.
"""
from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from pathlib import Path

import grpc
import pytest
from PIL import Image

from services.common import oip
from services.common.grpc_utils import bind, make_server
from services.gen import inference_pb2 as pb
from services.gen import inference_pb2_grpc
from services.loadgen import report as rep
from services.loadgen.runner import LoadConfig, LoadPage, run_load
from services.loadgen.schedule import Arrival

pytestmark = pytest.mark.integration

LINES = [oip.OcrLine("hello world", (0, 0, 50, 0, 50, 10, 0, 10), 0.9),
         oip.OcrLine("second line", (0, 20, 50, 20, 50, 30, 0, 30), 0.8)]

# Behaviour by request number modulo 10 (SLO 500 ms, timeout 1200 ms in these tests: wide
# margins so a busy 2-core machine does not turn an 'ok' into a late answer).
BEHAVIOUR = {0: "ok", 1: "drop", 2: "shed", 3: "invalid", 4: "late", 5: "ok",
             6: "unavailable", 7: "hang", 8: "ok", 9: "ok"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


class FakeFrontDoor(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Scripted OIP servicer; records every request number it saw."""

    def __init__(self, behaviour: dict[int, str] | None = None, delay_s: float = 0.0) -> None:
        self.behaviour = behaviour
        self.delay_s = delay_s
        self.seen: Counter[int] = Counter()
        self.images_ok = 0

    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        index = int(request.id.rsplit("-", 1)[1])
        self.seen[index] += 1
        # The loadgen's own requests must pass the front door's validation.
        oip.extract_image(request, max_bytes=8 << 20, max_side=4096)
        self.images_ok += 1
        what = "ok" if self.behaviour is None else self.behaviour[index % 10]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if what == "drop":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "would miss its deadline")
        if what == "shed":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed")
        if what == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
        if what == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker")
        if what == "late":
            await asyncio.sleep(0.7)
        if what == "hang":
            await asyncio.sleep(30)
        if what == "garbled":   # status OK, but no tensors in the answer
            return pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        path = "det-small/rec-tiny" if index % 2 == 0 else "det-tiny/rec-tiny"
        return oip.build_ocr_response(request.model_name, request.id, LINES,
                                      {"plan_version": 7, "variant_path": path})


async def _serve_and_run(servicer, config_kw: dict, **run_kw) -> rep.LoadReport:
    server = make_server()
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        config = LoadConfig(target=f"127.0.0.1:{port}", progress=False, **config_kw)
        return await run_load(config, **run_kw)
    finally:
        await server.stop(grace=None)


PAGES = [LoadPage("a", _png(), truth=[("hello world", (0, 0, 50, 0, 50, 10, 0, 10)),
                                      ("second line", (0, 20, 50, 20, 50, 30, 0, 30))]),
         LoadPage("b", _png(), truth=[("hello", (0, 0, 50, 0, 50, 10, 0, 10))]),
         LoadPage("c", _png(), truth=None)]


def test_counts_match_the_scripted_server():
    server = FakeFrontDoor(BEHAVIOUR)
    schedule = [Arrival(i * 0.01) for i in range(40)]  # 4 rounds of the 10 behaviours

    def fake_cer(pred, truth):
        assert pred == [(ln.text, ln.points) for ln in LINES]
        return 0.0 if len(truth) == 2 else 0.5

    report = asyncio.run(_serve_and_run(
        server, dict(rate=1.0, duration_s=1.0, slo_ms=500, timeout_ms=1200),
        pages=PAGES, schedule=schedule, cer_fn=fake_cer))

    assert report.sent == 40
    assert report.ok == 20          # 4 x (0, 4, 5, 8, 9)
    assert report.late == 4         # 4 x (4): 700 ms > 500 ms SLO
    assert report.on_time == 16
    assert report.dropped == 8      # 4 x (1) from the server + 4 x (7) by the client deadline
    assert report.shed == 4
    assert report.invalid == 4
    assert report.errors == {"UNAVAILABLE": 4}
    assert report.slo_violation_ratio == pytest.approx(24 / 40)  # (4 + 8 + 4 + 4 + 4) / 40
    assert report.sent == report.ok + report.dropped + report.shed + report.invalid + 4
    assert report.variant_paths == {"det-small/rec-tiny": 12, "det-tiny/rec-tiny": 8}
    assert report.plan_versions == {"7": 20}
    # Pages go round-robin (i % 3); the OK requests' pages: a -> CER 0, b -> 0.5, c -> none.
    ok_idx = [i for i in range(40) if BEHAVIOUR[i % 10] in ("ok", "late")]
    pages = Counter("abc"[i % 3] for i in ok_idx)
    assert report.cer_pages == pages["a"] + pages["b"]
    assert report.mean_cer == pytest.approx(0.5 * pages["b"] / (pages["a"] + pages["b"]))
    assert 700 <= report.latency_p99_ms < 1200
    # Every request reached the server (UNAVAILABLE may be retried by the channel's policy)
    # and the run ended soon after the last deadline (0.39 s + 1.2 s, plus slack).
    assert set(server.seen) == set(range(40))
    assert report.elapsed_s < 6.0


def test_an_ok_answer_that_does_not_parse_is_a_bad_response_and_the_rest_are_read():
    """Answers are read after the run, off the sending path: the unreadable ones become
    CLIENT_BAD_RESPONSE with the reason, the others keep their lines, plan version and path."""
    behaviour = {k: ("garbled" if k in (1, 6) else "ok") for k in range(10)}
    report = asyncio.run(_serve_and_run(
        FakeFrontDoor(behaviour), dict(rate=1.0, duration_s=1.0, slo_ms=2000, timeout_ms=3000),
        pages=PAGES[:1], schedule=[Arrival(i * 0.005) for i in range(20)], cer_fn=lambda pred, truth: 0.25))
    assert (report.sent, report.ok) == (20, 16)
    assert report.errors == {rep.BAD_RESPONSE: 4}
    bad = [r for r in report.records if r["outcome"] == rep.BAD_RESPONSE]
    assert {r["index"] % 10 for r in bad} == {1, 6}
    assert all("did not parse" in r["message"] and "has no output" in r["message"] for r in bad)
    assert report.plan_versions == {"7": 16} and sum(report.variant_paths.values()) == 16
    assert report.cer_pages == 16 and report.mean_cer == pytest.approx(0.25)


def test_poisson_run_every_request_counted_once():
    server = FakeFrontDoor(BEHAVIOUR)
    report = asyncio.run(_serve_and_run(
        server, dict(rate=40.0, duration_s=1.5, seed=3, slo_ms=200, timeout_ms=600),
        pages=PAGES[:1], cer_fn=None))
    from services.loadgen.schedule import poisson_schedule

    expected = len(poisson_schedule(40.0, 1.5, seed=3))
    assert report.sent == expected
    assert report.sent == (report.ok + report.dropped + report.shed + report.invalid
                           + report.total_errors)
    assert report.config["scheduled"] == expected and report.config["seed"] == 3


def test_in_flight_cap_refusals_count_as_errors():
    server = FakeFrontDoor(None, delay_s=0.3)
    schedule = [Arrival(0.0) for _ in range(10)]  # all at once
    report = asyncio.run(_serve_and_run(
        server, dict(rate=1.0, duration_s=1.0, max_in_flight=3, slo_ms=2000),
        pages=PAGES, schedule=schedule, cer_fn=None))
    assert (report.sent, report.ok) == (10, 3)
    assert report.errors == {rep.IN_FLIGHT_CAP: 7}
    assert report.slo_violation_ratio == pytest.approx(0.7)  # 7 refused / 10 sent
    assert sum(server.seen.values()) == 3


def test_unreachable_target_every_request_still_ends():
    # A port nobody listens on: every call fails fast, none hangs.
    config = LoadConfig(target="127.0.0.1:1", rate=1.0, duration_s=1.0, timeout_ms=500,
                        progress=False)
    report = asyncio.run(run_load(config, pages=PAGES, schedule=[Arrival(0.0)] * 5, cer_fn=None))
    assert report.sent == 5 and report.ok == 0
    assert sum(report.errors.values()) + report.dropped == 5


def test_cli_against_fake_server(tmp_path: Path, capsys):
    """pipeserve-loadgen main(): real pages directory, real CER, table and JSON."""
    from services.loadgen.main import main
    from services.ocr.pages import write_pages

    write_pages(tmp_path / "pages", count=2, seed=0, progress=False)

    async def scenario() -> int:
        server = make_server()
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FakeFrontDoor(), server)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        try:
            # main() calls asyncio.run itself: run it in a thread, off this loop.
            return await asyncio.to_thread(main, [
                "--target", f"127.0.0.1:{port}", "--pages", str(tmp_path / "pages"),
                "--rate", "20", "--duration", "0.5", "--quiet",
                "--json", str(tmp_path / "r.json")])
        finally:
            await server.stop(grace=None)

    assert asyncio.run(scenario()) == 0
    out = capsys.readouterr().out
    assert "SLO violation ratio" in out and "mean CER" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["sent"] == doc["ok"] > 0
    assert doc["cer_pages"] == doc["ok"] and doc["mean_cer"] > 0.5  # fixed text vs real pages


def test_a_send_made_late_by_the_generator_counts_its_lag_against_the_slo():
    """Open-loop accounting: the loop is blocked for 0.6 s (a stalled generator) just before
    the second request is due; the server answers at once, yet that request is late (SLO
    300 ms) because its latency counts from its scheduled time, and its record says so."""
    import time as _time

    server = FakeFrontDoor()
    schedule = [Arrival(0.0), Arrival(0.2)]

    async def run():
        asyncio.get_running_loop().call_later(0.05, _time.sleep, 0.6)
        return await _serve_and_run(server, dict(rate=1.0, duration_s=1.0, slo_ms=300, timeout_ms=5000),
                                    pages=PAGES[:1], schedule=schedule, cer_fn=None)

    report = asyncio.run(run())
    first, second = report.records
    assert report.ok == 2
    assert second["send_lag_ms"] >= 400                  # went out >= 0.4 s after 0.2 s
    assert second["latency_ms"] >= second["send_lag_ms"]  # latency includes the lag
    assert second["on_time"] is False and report.late >= 1
    assert second["sent_s"] == pytest.approx(second["scheduled_s"] + second["send_lag_ms"] / 1000, abs=1e-5)
    assert report.max_send_lag_ms >= 400 and report.send_lag_p99_ms >= 300
