"""Sending one schedule from several processes (``pipeserve-loadgen --procs N``).

One Python process with one event loop falls behind its schedule at a few thousand small
requests per second (docs/performance.md, section 4). :func:`run_senders` deals the
arrival schedule round-robin to ``N`` sender processes (arrival ``i`` goes to process
``i % N``, so the union is exactly the single-process schedule, with the same request
ids and pages), each with its own gRPC channel and event loop. All of them send at
``start + t_s`` on the machine's monotonic clock (the event loop's clock), with one
``start`` the parent hands out once every sender is connected and ready.

Each sender returns its per-request results as a few flat arrays and small string
tables (:func:`pack_results`), not as one object per request; the parent merges them
(:func:`merge_results`) and reports exactly as a single-process run does: latency from
the scheduled send time, send lag, outcomes, per-request records, CER (computed in the
parent), plan history (sampled in the parent).

Failure behaviour: a sender that dies, fails, or does not report in time fails the whole
run with :class:`SenderError` naming it; the others are stopped. The senders ignore
SIGINT: on Ctrl-C the parent stops them (SIGTERM, then SIGKILL). A sender whose parent
has gone stops by itself. Processes are started with the ``spawn`` method (gRPC's
threads do not survive ``fork``).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Callable, Sequence

import numpy as np

from services.common import oip
from services.common.tasks import raise_if_cancel_requested
from services.loadgen import report as rep
from services.loadgen.runner import (STOP_GRACE_S, LoadConfig, LoadPage, _Pending, _Sender,
                                     quiet_gc, request_budget_ms)
from services.loadgen.schedule import Arrival

# spawn + imports + connect take 1-3 s on a loaded 2-core machine; well under the 120 s
# a caller (the integration test) gives the whole CLI, so a stuck start says why in time
READY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0   # a sender waits this long for its channel before it says ready
START_MARGIN_S = 0.25     # t = 0 is this far after the last sender said ready
REPORT_MARGIN_S = 60.0    # past a sender's own hard stop, before the parent gives up on it
PROGRESS_EVERY_S = 0.5
STOP_WAIT_S = 3.0
# a sender waits this long for its start message (the parent sends it or stops the
# sender within READY_TIMEOUT_S)
START_TIMEOUT_S = READY_TIMEOUT_S + 30.0


class SenderError(RuntimeError):
    """A sender process died, failed or did not report: the run has no complete result."""


# ------------------------------------------------------------------ pure: split and merge

def split_schedule(schedule: Sequence[Arrival], procs: int) -> list[list[tuple[int, Arrival]]]:
    """Deal ``schedule`` to ``procs`` senders: sender ``k`` gets ``(i, schedule[i])`` for
    every ``i % procs == k``, in time order. Every index lands in exactly one part."""
    if procs < 1:
        raise ValueError(f"procs must be at least 1, got {procs}")
    return [[(i, schedule[i]) for i in range(k, len(schedule), procs)] for k in range(procs)]


def pack_arrivals(part: Sequence[tuple[int, Arrival]]) -> dict[str, np.ndarray]:
    """A part of the schedule as four arrays (NaN: no trace deadline)."""
    return {"index": np.array([i for i, _ in part], dtype=np.int64),
            "t_s": np.array([a.t_s for _, a in part], dtype=np.float64),
            "deadline_ms": np.array([np.nan if a.deadline_ms is None else a.deadline_ms
                                     for _, a in part], dtype=np.float64),
            "qos": np.array([a.qos for _, a in part], dtype=np.int64)}


def unpack_arrivals(packed: dict[str, np.ndarray]) -> list[tuple[int, Arrival]]:
    return [(int(i), Arrival(float(t), None if np.isnan(d) else float(d), int(q)))
            for i, t, d, q in zip(packed["index"], packed["t_s"], packed["deadline_ms"], packed["qos"])]


class _Table:
    """Interns values: each distinct one is stored once and referred to by its position."""

    def __init__(self) -> None:
        self.values: list = []
        self._ids: dict = {}

    def id(self, value) -> int:
        i = self._ids.get(value)
        if i is None:
            i = self._ids[value] = len(self.values)
            self.values.append(value)
        return i


def _opt(x: float | None) -> float:
    return np.nan if x is None else x


def _unopt(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def pack_results(results: Sequence[rep.RequestResult],
                 answers: dict[int, tuple[int, tuple[oip.OcrLine, ...]]]) -> dict:
    """Results (and, per OK answer, ``(page, lines)``) as flat arrays plus tables of the
    distinct codes, variant paths, messages and answers: a few bytes per request.
    CER and orientation accuracy are not carried (the parent computes them)."""
    codes, paths, messages, lines = _Table(), _Table(), _Table(), _Table()
    no = -1
    return {
        "index": np.array([r.index for r in results], dtype=np.int64),
        "code": np.array([codes.id(r.code) for r in results], dtype=np.int32),
        "latency_s": np.array([_opt(r.latency_s) for r in results], dtype=np.float64),
        "slo_s": np.array([r.slo_s for r in results], dtype=np.float64),
        "t_s": np.array([_opt(r.t_s) for r in results], dtype=np.float64),
        "send_lag_s": np.array([_opt(r.send_lag_s) for r in results], dtype=np.float64),
        "has_version": np.array([r.plan_version is not None for r in results], dtype=bool),
        "version": np.array([r.plan_version or 0 for r in results], dtype=np.int64),
        "path": np.array([no if r.variant_path is None else paths.id(r.variant_path) for r in results],
                         dtype=np.int32),
        "message": np.array([messages.id(r.message) for r in results], dtype=np.int32),
        "answer": np.array([lines.id(answers[r.index]) if r.index in answers else no for r in results],
                           dtype=np.int32),
        "codes": codes.values, "paths": paths.values, "messages": messages.values,
        "answers": lines.values,
    }


def unpack_results(packed: dict) -> tuple[list[rep.RequestResult],
                                          dict[int, tuple[int, tuple[oip.OcrLine, ...]]]]:
    """The inverse of :func:`pack_results`."""
    results, answers = [], {}
    for i, code, lat, slo, t, lag, has_v, v, path, msg, ans in zip(
            packed["index"].tolist(), packed["code"].tolist(), packed["latency_s"].tolist(),
            packed["slo_s"].tolist(), packed["t_s"].tolist(), packed["send_lag_s"].tolist(),
            packed["has_version"].tolist(), packed["version"].tolist(), packed["path"].tolist(),
            packed["message"].tolist(), packed["answer"].tolist()):
        results.append(rep.RequestResult(
            i, packed["codes"][code], _unopt(lat), slo, plan_version=v if has_v else None,
            variant_path=packed["paths"][path] if path >= 0 else None, t_s=_unopt(t),
            message=packed["messages"][msg], send_lag_s=_unopt(lag)))
        if ans >= 0:
            answers[i] = packed["answers"][ans]
    return results, answers


def merge_results(parts: Sequence[Sequence[rep.RequestResult]], scheduled: int) -> dict[int, rep.RequestResult]:
    """The senders' results by index. Raises ValueError when an index is outside the
    schedule or counted twice: every request has at most one outcome."""
    merged: dict[int, rep.RequestResult] = {}
    for part in parts:
        for r in part:
            if not 0 <= r.index < scheduled:
                raise ValueError(f"a sender returned request {r.index}, outside the schedule of {scheduled}")
            if r.index in merged:
                raise ValueError(f"request {r.index} returned twice")
            merged[r.index] = r
    return merged


# ------------------------------------------------------------------ the sender process

def sender_main(inbox: Connection, outbox: Connection, config: LoadConfig,
                pages: Sequence[LoadPage], packed: dict[str, np.ndarray],
                start_timeout_s: float = START_TIMEOUT_S) -> None:
    """A sender process: connect, say ``("ready",)``, wait (at most ``start_timeout_s``)
    for ``("start", t0)``, send its part, then ``("done", packed results, max lag, end
    time)``; ``("error", text)`` on failure. ``("progress", n)`` now and then while sending."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us on Ctrl-C
    try:
        asyncio.run(_sender(inbox, outbox, config, pages, unpack_arrivals(packed), start_timeout_s))
    except BaseException as exc:   # report it, whatever it is; the parent fails the run
        try:
            outbox.send(("error", f"{type(exc).__name__}: {exc}"[:500]))
        except OSError:
            pass
        raise SystemExit(1) from None


async def _sender(inbox: Connection, outbox: Connection, config: LoadConfig,
                  pages: Sequence[LoadPage], arrivals: list[tuple[int, Arrival]],
                  start_timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    parent = os.getppid()
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n

    sender = _Sender(config, pages, on_finish=count)
    try:
        try:   # connect before t = 0 (a target that is down answers UNAVAILABLE per request)
            await asyncio.wait_for(sender.channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        with quiet_gc():
            outbox.send(("ready",))
            # blocks: nothing else is due before t = 0 (a parent that died: EOFError)
            if not inbox.poll(start_timeout_s):
                raise SenderError(f"no start message from the parent within {start_timeout_s:g} s")
            message = inbox.recv()
            if message[0] != "start":
                raise SenderError(f"expected a start message, got {message[0]!r}")
            watch = asyncio.create_task(_watch(outbox, parent, lambda: done))
            try:
                await sender.run(arrivals, float(message[1]))
            finally:
                end = loop.time()
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
    finally:   # bounded: the results matter more than a clean channel close
        await asyncio.wait({asyncio.ensure_future(sender.close())}, timeout=STOP_WAIT_S)
    answers = {i: (p.page, tuple(p.lines or ())) for i, p in sender.pendings.items()}
    results = [sender.results[i] for i, _ in arrivals if i in sender.results]
    outbox.send(("done", pack_results(results, answers), sender.max_lag, end))


async def _watch(outbox: Connection, parent: int, done: Callable[[], int]) -> None:
    """Progress to the parent; stop when the parent has gone (nobody would read us)."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        if os.getppid() != parent:
            os._exit(1)
        outbox.send(("progress", done()))


# ------------------------------------------------------------------ the parent

@dataclass
class Sent:
    """What the senders returned, merged: as a single-process run has it."""

    results: dict[int, rep.RequestResult]
    pendings: dict[int, _Pending]
    max_lag: float
    elapsed_s: float


@dataclass
class _Child:
    number: int
    process: multiprocessing.process.BaseProcess
    inbox: Connection    # the parent writes here
    outbox: Connection   # the parent reads here
    done: int = 0

    def name(self) -> str:
        return f"sender process {self.number} (pid {self.process.pid})"


async def _message(child: _Child, deadline: float) -> tuple:
    """The child's next message; SenderError when it exited or reached ``deadline``
    (loop clock) first. Waits on the pipe and the process sentinel, so never hangs."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fds = (child.outbox.fileno(), child.process.sentinel)
    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        # asyncio.wait, not wait_for: on Python 3.11 wait_for drops a cancel (Ctrl-C) that
        # lands as a message arrives (CPython gh-86296), and the run then went on sending
        done, _ = await asyncio.wait({ready}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            raise SenderError(f"{child.name()} did not report in time; stopped it")
    finally:
        for fd in fds:
            loop.remove_reader(fd)
    if child.outbox.poll():
        try:
            message = child.outbox.recv()
        except EOFError:
            message = None
        if message is not None:
            if message[0] == "error":
                raise SenderError(f"{child.name()} failed: {message[1]}")
            return message
    child.process.join(STOP_WAIT_S)
    raise SenderError(f"{child.name()} exited (code {child.process.exitcode}) before returning "
                      "its results")


async def _expect(child: _Child, kind: str, deadline: float, bar=None) -> tuple:
    while True:
        message = await _message(child, deadline)
        raise_if_cancel_requested()   # a Ctrl-C swallowed on the way still stops the run
        if message[0] == kind:
            return message
        if message[0] == "progress":
            if bar is not None and message[1] > child.done:
                bar.update(message[1] - child.done)
            child.done = max(child.done, message[1])
            continue
        raise SenderError(f"{child.name()} sent {message[0]!r} where {kind!r} was due")


def _stop(children: Sequence[_Child]) -> None:
    for c in children:
        if c.process.is_alive():
            c.process.terminate()
    for c in children:
        c.process.join(STOP_WAIT_S)
        if c.process.is_alive():
            c.process.kill()
            c.process.join(STOP_WAIT_S)   # a daemon: one that still lingers goes with us
        c.inbox.close()
        c.outbox.close()


async def run_senders(config: LoadConfig, pages: Sequence[LoadPage], schedule: Sequence[Arrival], *,
                      sampler=None, bar=None) -> Sent:
    """Send ``schedule`` from ``config.procs`` processes; see the module docstring.
    ``sampler`` (a PlanSampler) runs here, from the senders' t = 0; ``bar`` (tqdm) gets
    their progress."""
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    parts = split_schedule(schedule, config.procs)
    # the senders need no truth, no plan history and no bar; the in-flight cap is shared
    child_config = replace(config, procs=1, progress=False, redis_url=None, controller=None,
                           max_in_flight=config.max_in_flight // config.procs)
    bare = [LoadPage(p.name, p.image) for p in pages]
    children: list[_Child] = []
    tasks: list[asyncio.Task] = []
    try:
        for k, part in enumerate(parts):
            child_in, inbox = ctx.Pipe(duplex=False)     # (reader, writer): no sockets
            outbox, child_out = ctx.Pipe(duplex=False)
            process = ctx.Process(target=sender_main, name=f"loadgen-sender-{k}", daemon=True,
                                  args=(child_in, child_out, child_config, bare, pack_arrivals(part)))
            children.append(_Child(k, process, inbox, outbox))
            process.start()
            child_in.close()
            child_out.close()
        ready_by = loop.time() + READY_TIMEOUT_S
        tasks = [asyncio.create_task(_expect(c, "ready", ready_by)) for c in children]
        await asyncio.gather(*tasks)
        start = loop.time() + START_MARGIN_S
        for c in children:
            c.inbox.send(("start", start))
        if sampler is not None:
            await sampler.start(start)
        try:
            span = schedule[-1].t_s if schedule else 0.0
            longest = max((request_budget_ms(config, a)[1] for a in schedule), default=0.0) / 1000.0
            report_by = start + span + longest + STOP_GRACE_S + REPORT_MARGIN_S
            tasks = [asyncio.create_task(_expect(c, "done", report_by, bar)) for c in children]
            done = await asyncio.gather(*tasks)
        finally:
            if sampler is not None:
                await sampler.stop()
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        _stop(children)
    parts_out, answers = [], {}
    for _, packed, _, _ in done:
        results, got = unpack_results(packed)
        parts_out.append(results)
        answers.update(got)
    merged = merge_results(parts_out, len(schedule))
    if bar is not None:   # the last progress messages may predate the results
        bar.update(max(0, len(merged) - sum(c.done for c in children)))
    pendings = {i: _Pending(i, page, merged[i].slo_s, list(lines)) for i, (page, lines) in answers.items()}
    return Sent(merged, pendings, max(m[2] for m in done), max(m[3] for m in done) - start)
