"""The multi-process sender's pure parts (dealing a schedule, packing and merging results)
and its failure path: a sender process that dies fails the run instead of hanging."""
from __future__ import annotations

import asyncio
import multiprocessing
import os

import pytest

from services.common import oip
from services.loadgen import report as rep
from services.loadgen.runner import LoadConfig
from services.loadgen.schedule import Arrival, poisson_schedule, trace_schedule, TraceEntry
from services.loadgen.senders import (SenderError, _Child, _expect, merge_results, pack_arrivals,
                                      pack_results, split_schedule, unpack_arrivals, unpack_results)


@pytest.mark.parametrize("procs", [1, 2, 3, 7])
def test_split_deals_every_arrival_to_exactly_one_sender(procs):
    schedule = poisson_schedule(200.0, 2.0, seed=4)
    parts = split_schedule(schedule, procs)
    assert len(parts) == procs
    indices = sorted(i for part in parts for i, _ in part)
    assert indices == list(range(len(schedule)))                    # the union, once each
    assert sorted((i, a) for part in parts for i, a in part) == list(enumerate(schedule))
    for k, part in enumerate(parts):
        assert all(i % procs == k for i, _ in part)                # round-robin
        times = [a.t_s for _, a in part]
        assert times == sorted(times)                              # each part in time order
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_split_of_fewer_arrivals_than_senders_leaves_some_empty():
    parts = split_schedule([Arrival(0.1), Arrival(0.2)], 3)
    assert parts == [[(0, Arrival(0.1))], [(1, Arrival(0.2))], []]
    with pytest.raises(ValueError):
        split_schedule([Arrival(0.1)], 0)


def test_arrivals_survive_packing_with_trace_deadlines_and_qos():
    schedule = trace_schedule([TraceEntry(10.0, 1, 250.0), TraceEntry(12.5, 0, 90.0)]) + [Arrival(0.5)]
    part = list(enumerate(schedule))
    assert unpack_arrivals(pack_arrivals(part)) == part
    assert unpack_arrivals(pack_arrivals([])) == []


def _results() -> tuple[list[rep.RequestResult], dict]:
    line = oip.OcrLine("abc", (0, 0, 1, 0, 1, 1, 0, 1), 0.9)
    results = [
        rep.RequestResult(0, rep.OK, 0.012, 1.5, plan_version=3, variant_path="a/b", t_s=0.01,
                          send_lag_s=0.0004),
        rep.RequestResult(2, rep.OK, 0.020, 1.5, plan_version=4, variant_path="a/b", t_s=0.02,
                          send_lag_s=0.0),
        rep.RequestResult(4, "DEADLINE_EXCEEDED", 1.5, 1.5, t_s=0.03, message="late by 3 ms",
                          send_lag_s=0.001),
        rep.RequestResult(6, rep.IN_FLIGHT_CAP, None, 0.25, t_s=0.04),   # never sent: no lag
        rep.RequestResult(8, rep.OK, 0.030, 1.5, plan_version=0, variant_path="c/d", t_s=0.05,
                          send_lag_s=0.002),
    ]
    answers = {0: (0, (line,)), 2: (0, (line,)), 8: (1, ())}
    return results, answers


def test_results_survive_packing_and_answers_are_stored_once():
    results, answers = _results()
    packed = pack_results(results, answers)
    back, back_answers = unpack_results(packed)
    assert back == results
    assert back_answers == answers
    assert len(packed["answers"]) == 2        # requests 0 and 2 share one answer
    assert sorted(packed["codes"]) == sorted({r.code for r in results})
    assert packed["paths"] == ["a/b", "c/d"]
    assert back[3].latency_s is None and back[3].send_lag_s is None
    assert back[4].plan_version == 0 and back[3].plan_version is None   # 0 is a version


def test_merge_takes_every_part_and_refuses_double_or_foreign_outcomes():
    results, _ = _results()
    merged = merge_results([results[:2], results[2:]], scheduled=9)
    assert sorted(merged) == [0, 2, 4, 6, 8] and merged[4] == results[2]
    with pytest.raises(ValueError, match="request 2 returned twice"):
        merge_results([results[:2], results[1:]], scheduled=9)
    with pytest.raises(ValueError, match="outside the schedule"):
        merge_results([results], scheduled=5)


def test_config_refuses_an_in_flight_cap_below_the_process_count():
    base = dict(target="x:1", rate=1.0, duration_s=1.0)
    LoadConfig(**base, procs=4, max_in_flight=4).validate()
    with pytest.raises(ValueError, match="at least procs"):
        LoadConfig(**base, procs=4, max_in_flight=3).validate()
    with pytest.raises(ValueError, match="procs must be at least 1"):
        LoadConfig(**base, procs=0).validate()


def test_a_sender_that_dies_fails_the_run_with_its_exit_code():
    ctx = multiprocessing.get_context("spawn")
    outbox, child_out = ctx.Pipe(duplex=False)
    child_in, inbox = ctx.Pipe(duplex=False)
    process = ctx.Process(target=os._exit, args=(3,), daemon=True)   # dies without a word
    process.start()
    child_out.close()
    child = _Child(1, process, inbox, outbox)

    async def wait_ready():
        loop = asyncio.get_running_loop()
        return await _expect(child, "ready", loop.time() + 60)

    try:
        with pytest.raises(SenderError, match=r"sender process 1 \(pid \d+\) exited \(code 3\)"):
            asyncio.run(wait_ready())
    finally:
        process.join(5)
        for c in (outbox, inbox, child_in):
            c.close()
    assert process.exitcode == 3


def test_a_silent_sender_times_out_and_a_failing_one_says_why():
    import time

    ctx = multiprocessing.get_context("spawn")
    outbox, child_out = ctx.Pipe(duplex=False)
    child_in, inbox = ctx.Pipe(duplex=False)
    process = ctx.Process(target=time.sleep, args=(60,), daemon=True)   # alive, never speaks
    process.start()
    child = _Child(0, process, inbox, outbox)

    async def wait(kind, seconds):
        loop = asyncio.get_running_loop()
        return await _expect(child, kind, loop.time() + seconds)

    try:
        with pytest.raises(SenderError, match="did not report in time"):
            asyncio.run(wait("done", 0.3))
        child_out.send(("progress", 5))        # what a sender says, written on its behalf
        child_out.send(("error", "RuntimeError: boom"))
        with pytest.raises(SenderError, match="sender process 0 .* failed: RuntimeError: boom"):
            asyncio.run(wait("done", 10))
        assert child.done == 5
    finally:
        process.kill()
        process.join(5)
        for c in (outbox, inbox, child_in, child_out):
            c.close()


def test_the_cli_passes_procs_and_keeps_one_process_by_default(tmp_path):
    from services.loadgen.main import build_parser, config_from_args, main

    base = ["--pages", str(tmp_path), "--rate", "5", "--duration", "1"]
    assert config_from_args(build_parser().parse_args(base)).procs == 1
    assert config_from_args(build_parser().parse_args(base + ["--procs", "3"])).procs == 3
    for bad in (["--procs", "0"], ["--procs", "4", "--max-in-flight", "3"]):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        assert exc.value.code == 2


def test_a_sender_never_started_reports_it_instead_of_waiting_for_ever():
    from services.loadgen.runner import LoadPage
    from services.loadgen.senders import sender_main

    ctx = multiprocessing.get_context("spawn")
    child_in, inbox = ctx.Pipe(duplex=False)
    outbox, child_out = ctx.Pipe(duplex=False)
    config = LoadConfig(target="127.0.0.1:1", pipeline="echo", rate=1.0, duration_s=1.0, progress=False)
    process = ctx.Process(target=sender_main, daemon=True,
                          args=(child_in, child_out, config, [LoadPage("p", b"x")],
                                pack_arrivals([(0, Arrival(0.1))]), 0.5))   # start within 0.5 s
    process.start()
    child_in.close()
    child_out.close()
    child = _Child(0, process, inbox, outbox)

    async def wait(kind):
        loop = asyncio.get_running_loop()
        return await _expect(child, kind, loop.time() + 60)

    try:
        assert asyncio.run(wait("ready")) == ("ready",)
        # the parent sends no start message: the sender says so and exits
        with pytest.raises(SenderError, match="failed: SenderError: no start message from the parent"):
            asyncio.run(wait("start"))
        process.join(10)
        assert process.exitcode == 1
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        inbox.close()
        outbox.close()
