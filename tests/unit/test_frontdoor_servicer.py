"""FrontDoorServicer in process: a fake router core (the ``route``/``ready``/``plan``/``spec``
the servicer uses), a fake gRPC context that aborts like the real one, the real spec of
pipelines/ocr.yaml and the real OIP codec."""
from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from PIL import Image

from services.common import oip
from services.common.errors import Unavailable
from services.common.spec import load_spec
from services.gen import inference_pb2 as ipb
from services.gen import pipeserve_pb2 as pb
from services.policy.admission import TokenBucket
from services.policy.fairness import Ticket
from services.router import frontdoor_plane as plane_mod
from services.router.frontdoor_plane import FrontDoorPlane, RawInferRequest
from services.router.frontdoor_results import INTERNAL_MESSAGE
from services.router.servicer import FrontDoorServicer, receive_limit_bytes

SPEC = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml")
OUTCOMES = ("ok", "dropped", "shed", "invalid", "not_found", "failed", "cancelled")
ADDRESS = "127.0.0.1"


def _png(w: int = 64, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def ok_result(query_id: str, n_lines: int = 2) -> pb.QueryResult:
    r = pb.QueryResult(query_id=query_id, status=pb.OK, task="det", variant="det_v6small_480")
    for i in range(n_lines):
        r.regions.add(points=[0, i, 10, i, 10, i + 5, 0, i + 5], score=0.9)
        r.children.add(query_id=f"{query_id}.{i}", status=pb.OK, task="rec", variant="rec_v6tiny"
                       ).regions.add(text=f"line {i}", confidence=0.8)
    return r


class FakeCore:
    """What FrontDoorServicer needs of RouterCore. ``behaviour(query_id)`` gives the
    result tree (or raises); ``gate``, when set, holds every route() until it is set."""

    def __init__(self, behaviour=None, ready: bool = True) -> None:
        self.spec = SPEC
        self.plan = SimpleNamespace(version=7)
        self.behaviour = behaviour or ok_result
        self._ready = ready
        self.calls: list[tuple[str, float, list, str]] = []
        self.gate: asyncio.Event | None = None

    def ready(self) -> bool:
        return self._ready

    async def route(self, request_id, deadline_s, queries, upstream_path):
        self.calls.append((request_id, deadline_s, list(queries), upstream_path))
        if self.gate is not None:
            await self.gate.wait()
        return [self.behaviour(queries[0].query_id)]


class FakeContext:
    """grpc.aio.ServicerContext as the servicer uses it: time_remaining(), an abort() that
    records the status and raises AbortError, as the real one does, and for the
    stream-unary ModelInferStream read(), which gives ``body`` (wire bytes, deserialised
    as add_front_door_to_server does) once ``gate`` is set."""

    def __init__(self, time_remaining: float | None = None, body: bytes | None = None,
                 gate: asyncio.Event | None = None, peer: str = "ipv4:127.0.0.1:40000",
                 metadata: tuple = ()) -> None:
        self._remaining = time_remaining
        self._peer, self._metadata = peer, metadata
        self.body, self.gate = body, gate
        self.reads = 0
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def time_remaining(self):
        return self._remaining

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    async def read(self):
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        return grpc.aio.EOF if self.body is None else RawInferRequest(self.body)

    async def abort(self, code, details=""):
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


@pytest.fixture()
def make_servicer():
    made = []

    def make(core=None, rate=None, **kw) -> FrontDoorServicer:
        s = FrontDoorServicer(FrontDoorPlane(core or FakeCore(), TokenBucket(rate), **kw))
        made.append(s)
        return s

    yield make
    for s in made:
        s.plane.close()


def call(servicer, request, ctx=None):
    """One ModelInfer: (response or None, context)."""
    ctx = ctx or FakeContext()

    async def go():
        try:
            return await servicer.ModelInfer(request, ctx)
        except grpc.aio.AbortError:
            return None

    return asyncio.run(go()), ctx


def outcomes(servicer) -> dict[str, int]:
    return {k: v for k, v in servicer.plane.counts.items() if k in OUTCOMES and v}


def request(image: bytes = PNG, model: str = "ocr", **kw) -> ipb.ModelInferRequest:
    return oip.build_image_request(model, image, **kw)


# --------------------------------------------------------------------------- OK and deadlines


def test_ok_request_returns_lines_and_counts_once(make_servicer):
    s = make_servicer()
    resp, ctx = call(s, request(request_id="r1"))
    assert ctx.code is None
    lines = oip.parse_ocr_response(resp)
    assert [ln.text for ln in lines] == ["line 0", "line 1"]
    assert oip.read_parameters(resp.parameters) == {"plan_version": 7,
                                                    "variant_path": "det_v6small_480/rec_v6tiny"}
    assert resp.id == "r1"
    [(rid, _, queries, upstream)] = s.plane.core.calls
    assert rid == "r1" and upstream == "" and queries[0].payload == PNG
    assert s.plane.counts == {"arrived": 1, "received": 1, "accepted": 1, "ok": 1, "dropped": 0, "shed": 0,
                        "invalid": 0, "not_found": 0, "failed": 0, "cancelled": 0, "expired": 0}


@pytest.mark.parametrize("grpc_left, timeout_ms, expected_budget", [
    (None, None, 1.5),      # only the SLO (pipelines/ocr.yaml: 1500 ms)
    (30.0, 5000, 1.5),      # the SLO is the earliest
    (None, 300, 0.3),       # the timeout parameter is
    (10.0, 400, 0.4),
    (0.25, 900, 0.25),      # the gRPC deadline is
    (0.2, None, 0.2),
])
def test_deadline_is_the_earliest_of_grpc_timeout_and_slo(make_servicer, grpc_left, timeout_ms,
                                                          expected_budget):
    s = make_servicer()
    before = time.time()
    resp, ctx = call(s, request(timeout_ms=timeout_ms), FakeContext(grpc_left))
    after = time.time()
    assert ctx.code is None and resp is not None
    [(_, deadline, _, _)] = s.plane.core.calls
    # the pipeline works to the deadline less the margin the front door keeps to answer in time
    routed = expected_budget - plane_mod.DEFAULT_ANSWER_MARGIN_MS / 1e3
    assert before + routed - 1e-6 <= deadline <= after + routed + 1e-6


@pytest.mark.parametrize("grpc_left, timeout_ms, says", [
    (-0.5, None, "already passed"),
    (0.0, None, "already passed"),
    (0.005, None, "leaves 5 ms"),
    (None, 2, "leaves 2 ms"),
    (30.0, 10, "leaves 10 ms"),
])
def test_request_that_cannot_make_its_deadline_is_dropped_before_validation(
        make_servicer, monkeypatch, grpc_left, timeout_ms, says):
    validated = []
    monkeypatch.setattr(oip, "extract_image", lambda *a, **k: validated.append(1) or PNG)
    s = make_servicer()
    # the payload is not even an image: the drop must come before anyone looks at it
    resp, ctx = call(s, request(b"not an image at all", timeout_ms=timeout_ms), FakeContext(grpc_left))
    assert resp is None and ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert says in ctx.details and "dropped on arrival" in ctx.details
    assert validated == [] and s.plane.core.calls == []
    assert outcomes(s) == {"dropped": 1} and s.plane.counts["received"] == 0


def test_budget_floor_is_configurable(make_servicer):
    s = make_servicer(min_budget_ms=100)
    _, ctx = call(s, request(timeout_ms=80))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and "less than the 100 ms" in ctx.details
    _, ctx = call(s, request(timeout_ms=160))   # 160 - 50 (the answer margin) >= 100
    assert ctx.code is None
    assert outcomes(s) == {"dropped": 1, "ok": 1}


# --------------------------------------------------------------------------- shedding


def test_admission_token_bucket_sheds_with_resource_exhausted(make_servicer):
    s = make_servicer(rate=1.0)   # capacity 1: the second request in the same second is shed
    _, first = call(s, request())
    _, second = call(s, request())
    assert first.code is None
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "admission rate of 1.0 requests/s" in second.details
    assert len(s.plane.core.calls) == 1
    assert outcomes(s) == {"ok": 1, "shed": 1}
    assert s.plane.counts["received"] == 2 and s.plane.counts["accepted"] == 1   # shed requests are demand


def _stream(servicer, ctx):
    """ModelInferStream as gRPC runs it; AbortError (the status is in ctx) -> None."""
    async def go():
        try:
            return await servicer.ModelInferStream(iter(()), ctx)
        except grpc.aio.AbortError:
            return None
    return go()


def test_no_room_for_one_more_request_sheds_before_the_body_is_read(make_servicer):
    core = FakeCore()
    body = request().SerializeToString()
    # room for one more of the largest allowed size while in flight <= 1.5 x this request
    s = make_servicer(core, max_inflight_bytes=SPEC.input.max_bytes + int(1.5 * len(body)))

    async def scenario():
        core.gate = asyncio.Event()
        ctxs = [FakeContext(body=body) for _ in range(4)]
        held = [asyncio.create_task(_stream(s, c)) for c in ctxs[:2]]
        while len(core.calls) < 2:          # two in flight, held inside route()
            await asyncio.sleep(0.001)
        assert s.plane.inflight_bytes == 2 * len(body)
        await asyncio.wait_for(_stream(s, ctxs[2]), 10)   # over 1.5 x: shed, never read
        core.gate.set()
        done = await asyncio.gather(*held)
        assert s.plane.inflight_bytes == 0
        await asyncio.wait_for(_stream(s, ctxs[3]), 10)   # room again
        return done, ctxs

    done, ctxs = asyncio.run(scenario())
    assert all(d is not None for d in done)
    assert ctxs[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctxs[2].reads == 0
    assert "server busy" in ctxs[2].details and "retry later" in ctxs[2].details
    assert [c.code for c in (ctxs[0], ctxs[1], ctxs[3])] == [None, None, None]
    assert [c.reads for c in (ctxs[0], ctxs[1], ctxs[3])] == [1, 1, 1]
    assert outcomes(s) == {"ok": 3, "shed": 1}
    assert s.plane.counts["received"] == 3   # the shed one was never read


def test_bodies_read_at_once_are_limited_and_checked_against_the_cap_once_read(make_servicer):
    body = request(PNG + b"\0" * 300_000).SerializeToString()   # trailing bytes: still a PNG
    core = FakeCore()
    s = make_servicer(core=core, max_inflight_bytes=int(2.5 * len(body)), max_receiving=3)

    async def scenario():
        gate = asyncio.Event()
        core.gate = asyncio.Event()          # admitted requests stay in flight until released
        ctxs = [FakeContext(body=body, gate=gate) for _ in range(4)]
        tasks = [asyncio.create_task(_stream(s, c)) for c in ctxs[:3]]
        while s.plane.receiving < 3:               # three bodies being read, none in flight yet
            await asyncio.sleep(0.001)
        await asyncio.wait_for(_stream(s, ctxs[3]), 10)   # a fourth: not even read
        gate.set()                           # the three arrive; 3 x size > 2.5 x size
        while len(core.calls) < 2:
            await asyncio.sleep(0.001)
        core.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return ctxs

    ctxs = asyncio.run(scenario())
    assert ctxs[3].code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctxs[3].reads == 0
    assert "3 being received" in ctxs[3].details
    codes = sorted(str(c.code) for c in ctxs[:3])
    assert codes == sorted([str(None), str(None), str(grpc.StatusCode.RESOURCE_EXHAUSTED)])
    late = next(c for c in ctxs[:3] if c.code is not None)
    assert late.reads == 1 and "would pass the limit" in late.details
    assert outcomes(s) == {"ok": 2, "shed": 2}
    assert s.plane.inflight_bytes == 0 and s.plane.receiving == 0


def test_after_small_bodies_arrivals_over_the_read_limit_wait_for_a_slot_instead_of_being_shed(make_servicer):
    body = request().SerializeToString()     # a 1 KB-class request: 2 of them fit the room many times
    s = make_servicer(max_receiving=2)

    async def scenario():
        first = FakeContext(body=body)
        await asyncio.wait_for(_stream(s, first), 10)     # one small body seen: waiting allowed
        gate = asyncio.Event()
        ctxs = [FakeContext(body=body, gate=gate) for _ in range(6)]
        tasks = [asyncio.create_task(_stream(s, c)) for c in ctxs]
        while s.plane.waiting_to_receive < 4:                        # two read at once, four wait
            await asyncio.sleep(0.001)
        reading = sum(c.reads for c in ctxs)
        assert s.plane.receiving == 2 and reading == 2
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return first, ctxs

    first, ctxs = asyncio.run(scenario())
    assert [c.code for c in [first, *ctxs]] == [None] * 7 and all(c.reads == 1 for c in ctxs)
    assert outcomes(s) == {"ok": 7}
    assert s.plane.receiving == 0 and not s.plane.waiting_to_receive and s.plane.inflight_bytes == 0


def test_a_wait_for_a_read_slot_ends_at_the_deadline_and_the_wait_queue_is_bounded(make_servicer):
    body = request().SerializeToString()
    s = make_servicer(max_receiving=1, max_waiting_to_receive=1)

    async def scenario():
        await asyncio.wait_for(_stream(s, FakeContext(body=body)), 10)   # a small body seen
        gate = asyncio.Event()
        reading = FakeContext(body=body, gate=gate)
        held = asyncio.create_task(_stream(s, reading))
        while s.plane.receiving < 1:
            await asyncio.sleep(0.001)
        # 0.5 s left, 20 ms the least a request needs: waits up to 0.48 s, then dropped unread
        waiter = FakeContext(body=body, time_remaining=0.5)
        waiting = asyncio.create_task(_stream(s, waiter))
        while not s.plane.waiting_to_receive:
            await asyncio.sleep(0.001)
        extra = FakeContext(body=body)
        await asyncio.wait_for(_stream(s, extra), 10)     # the one waiting place is taken: shed
        t0 = time.perf_counter()
        await asyncio.wait_for(waiting, 10)
        waited = time.perf_counter() - t0
        gate.set()
        await asyncio.wait_for(held, 10)
        return reading, waiter, extra, waited

    reading, waiter, extra, waited = asyncio.run(scenario())
    assert reading.code is None
    assert waiter.code == grpc.StatusCode.DEADLINE_EXCEEDED and waiter.reads == 0
    assert "waited for one of the 1 slots" in waiter.details and 0.3 < waited < 5
    assert extra.code == grpc.StatusCode.RESOURCE_EXHAUSTED and extra.reads == 0
    assert outcomes(s) == {"ok": 2, "dropped": 1, "shed": 1}
    assert s.plane.receiving == 0 and not s.plane.waiting_to_receive


def test_arrivals_waiting_for_a_read_slot_are_shed_unread_once_a_large_body_is_read(make_servicer):
    small = request().SerializeToString()
    big = request(PNG + b"\0" * 300_000).SerializeToString()
    s = make_servicer(max_receiving=3, max_inflight_bytes=int(2.5 * len(big)))

    async def scenario():
        await asyncio.wait_for(_stream(s, FakeContext(body=small)), 10)   # small bodies so far
        gate = asyncio.Event()
        reading = [FakeContext(body=b, gate=gate) for b in (big, small, small)]
        tasks = [asyncio.create_task(_stream(s, c)) for c in reading]
        while s.plane.receiving < 3:
            await asyncio.sleep(0.001)
        waiters = [FakeContext(body=small) for _ in range(3)]
        waiting = [asyncio.create_task(_stream(s, c)) for c in waiters]
        while s.plane.waiting_to_receive < 3:
            await asyncio.sleep(0.001)
        gate.set()     # the big body is read first: 3 x big no longer fits 2.5 x big
        await asyncio.wait_for(asyncio.gather(*tasks, *waiting), 10)
        return reading, waiters

    reading, waiters = asyncio.run(scenario())
    assert [c.code for c in reading] == [None] * 3
    assert [c.code for c in waiters] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert all(c.reads == 0 and "large requests arrived" in c.details for c in waiters)
    assert outcomes(s) == {"ok": 4, "shed": 3}
    assert s.plane.receiving == 0 and not s.plane.waiting_to_receive


def test_a_slot_handed_to_a_waiter_as_it_is_cancelled_passes_on(make_servicer):
    body = request().SerializeToString()
    s = make_servicer(max_receiving=1)

    async def scenario():
        await asyncio.wait_for(_stream(s, FakeContext(body=body)), 10)
        gate = asyncio.Event()
        held = asyncio.create_task(_stream(s, FakeContext(body=body, gate=gate)))
        while s.plane.receiving < 1:
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(_stream(s, FakeContext(body=body)))   # its client goes away
        last = FakeContext(body=body)
        waiting = asyncio.create_task(_stream(s, last))
        while s.plane.waiting_to_receive < 2:
            await asyncio.sleep(0.001)
        client = FakeContext().peer()
        phantom = Ticket(client, -1, 0.0)   # one more read ends (a slot for it, so the count stays whole):
        s.plane.gate.policy._active[client].reading += 1
        s.plane.gate.policy.reading += 1
        s.plane.gate.leave(phantom)      # its slot is handed to `gone` ...
        gone.cancel()              # ... which is cancelled before it runs: the slot passes on
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.set()
        await asyncio.wait_for(asyncio.gather(held, waiting), 10)
        return last

    last = asyncio.run(scenario())
    assert last.code is None and last.reads == 1
    assert s.plane.receiving == 0 and not s.plane.waiting_to_receive


def test_expired_grpc_deadline_is_dropped_before_the_body_is_read(make_servicer):
    s = make_servicer()
    ctx = FakeContext(time_remaining=-0.01, body=request().SerializeToString())
    asyncio.run(_stream(s, ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and ctx.reads == 0
    assert outcomes(s) == {"dropped": 1} and s.plane.core.calls == []


@pytest.mark.parametrize("body, code, says", [
    (b"\xff\xfe\x00garbage that is not protobuf", grpc.StatusCode.INVALID_ARGUMENT,
     "not a valid ModelInferRequest"),
    (None, grpc.StatusCode.INVALID_ARGUMENT, "no request message"),
    (request(model="nope").SerializeToString(), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
])
def test_stream_form_rejects_what_is_not_a_request(make_servicer, body, code, says):
    s = make_servicer()
    ctx = FakeContext(body=body)
    asyncio.run(_stream(s, ctx))
    assert ctx.code == code and says in ctx.details
    assert s.plane.core.calls == [] and sum(outcomes(s).values()) == 1


def test_stream_form_serves_a_good_request(make_servicer):
    s = make_servicer()
    ctx = FakeContext(body=request(request_id="w1").SerializeToString())
    resp = asyncio.run(_stream(s, ctx))
    assert ctx.code is None and resp.id == "w1" and len(oip.parse_ocr_response(resp)) == 2
    assert s.plane.core.calls[0][2][0].payload == PNG and outcomes(s) == {"ok": 1}


def test_a_single_request_over_the_cap_is_taken_when_nothing_is_in_flight(make_servicer):
    s = make_servicer(max_inflight_bytes=10)
    _, ctx = call(s, request())
    assert ctx.code is None and outcomes(s) == {"ok": 1}


def test_default_limits_follow_the_spec(make_servicer):
    s = make_servicer()
    assert s.plane.max_inflight_bytes == 4 * SPEC.input.max_bytes
    assert receive_limit_bytes(SPEC) == 2 * SPEC.input.max_bytes + 64 * 1024


# --------------------------------------------------------------------------- bad input


def _bomb_header_png(w: int, h: int) -> bytes:
    """Only a valid signature, IHDR and an empty IDAT: the header check must refuse it from
    the declared size without needing the pixels."""
    import struct
    import zlib

    def chunk(t: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("image, says", [
    (b"", "empty image"),
    (b"GIF89a" + b"\0" * 30, "not a PNG or JPEG"),
    (_bomb_header_png(20_000, 20_000), "20000x20000, larger than the limit of 4096 pixels per side"),
    (_bomb_header_png(4096, 4096), "4096x4096 = 16777216 pixels, more than the limit of 12582912"),
    (PNG[:20], "cannot read the image header"),
])
def test_bad_images_are_invalid_argument_and_never_routed(make_servicer, image, says):
    s = make_servicer()
    _, ctx = call(s, request(image))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and says in ctx.details
    assert s.plane.core.calls == [] and outcomes(s) == {"invalid": 1} and s.plane.counts["received"] == 0


def test_bad_timeout_parameter_is_invalid_argument(make_servicer):
    s = make_servicer()
    req = request()
    req.parameters["timeout"].string_param = "soon"
    _, ctx = call(s, req)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "'timeout'" in ctx.details
    assert outcomes(s) == {"invalid": 1}


def test_unknown_model_is_not_found_and_counted_once(make_servicer):
    s = make_servicer()
    _, ctx = call(s, request(model="nope"))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "'nope'" in ctx.details and "'ocr'" in ctx.details
    assert s.plane.core.calls == [] and outcomes(s) == {"not_found": 1}
    assert s.plane.counts["received"] == 0 and s.plane.counts["accepted"] == 0


def test_not_ready_is_unavailable(make_servicer):
    s = make_servicer(FakeCore(ready=False))
    _, ctx = call(s, request())
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "retry later" in ctx.details
    assert s.plane.core.calls == [] and outcomes(s) == {"failed": 1}


def test_raw_pixels_are_validated_and_encoded_off_the_event_loop(make_servicer, monkeypatch):
    threads = []
    real = oip._encode_png

    def spy(pixels):
        threads.append(threading.current_thread().name)
        return real(pixels)

    monkeypatch.setattr(oip, "_encode_png", spy)
    s = make_servicer()
    pixels = np.full((24, 40, 3), 255, np.uint8)
    req = ipb.ModelInferRequest(model_name="ocr")
    req.inputs.add(name="image", datatype="UINT8", shape=[24, 40, 3])
    req.raw_input_contents.append(pixels.tobytes())
    resp, ctx = call(s, req)
    assert ctx.code is None and resp is not None
    assert threads and threads[0].startswith("frontdoor-validate")
    payload = s.plane.core.calls[0][2][0].payload
    with Image.open(io.BytesIO(payload)) as im:
        assert im.format == "PNG" and im.size == (40, 24)
    # a mismatched byte count is refused before anything is routed
    req.raw_input_contents[0] = pixels.tobytes()[:-3]
    _, ctx = call(s, req)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "but 2877 bytes were sent" in ctx.details
    assert len(s.plane.core.calls) == 1 and outcomes(s) == {"ok": 1, "invalid": 1}


# --------------------------------------------------------------------------- failures inside


def _with_child(status: int, message: str):
    def behaviour(qid):
        r = ok_result(qid)
        r.children[1].status = status
        r.children[1].message = message
        del r.children[1].regions[:]
        return r
    return behaviour


def _root(status: int, message: str):
    return lambda qid: pb.QueryResult(query_id=qid, status=status, message=message, task="det")


def _raise(exc):
    def behaviour(qid):
        raise exc
    return behaviour


@pytest.mark.parametrize("behaviour, code, says, counter", [
    (_with_child(pb.DROPPED_DEADLINE, f"worker {ADDRESS}:50123: DEADLINE_EXCEEDED: Deadline Exceeded"),
     grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", "dropped"),
    (_root(pb.DROPPED_DEADLINE, "deadline passed before dispatch"),
     grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", "dropped"),
    (_with_child(pb.INVALID, "payload is not a decodable image: broken data stream"),
     grpc.StatusCode.INTERNAL, "internal error", "failed"),   # our crop: our fault
    (_root(pb.INVALID, "payload is not a decodable image: image file is truncated (9 bytes not processed)"),
     grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded", "invalid"),   # the client's page
    (_with_child(pb.SHED, f"router rec: RESOURCE_EXHAUSTED: worker {ADDRESS}:50200 busy"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "over capacity", "shed"),
    (_with_child(pb.UNAVAILABLE, f"router rec: UNAVAILABLE: failed to connect to all addresses; "
                                 f"last error: ipv4:{ADDRESS}:50071: Connection refused"),
     grpc.StatusCode.UNAVAILABLE, "unavailable", "failed"),
    (_with_child(pb.INTERNAL, f"worker {ADDRESS}:50123: INTERNAL: Traceback (most recent call last)"),
     grpc.StatusCode.INTERNAL, "internal error", "failed"),
    (_raise(RuntimeError(f"cannot reach {ADDRESS}:50123")),
     grpc.StatusCode.INTERNAL, "internal error", "failed"),
    (_raise(Unavailable(f"worker {ADDRESS}:50123 is gone")),
     grpc.StatusCode.UNAVAILABLE, "unavailable", "failed"),
])
def test_failures_inside_map_to_one_status_with_a_generic_message(make_servicer, behaviour, code,
                                                                   says, counter):
    s = make_servicer(FakeCore(behaviour))
    resp, ctx = call(s, request())
    assert resp is None and ctx.code == code
    assert says in ctx.details.lower()
    assert ADDRESS not in ctx.details and "50123" not in ctx.details and "Traceback" not in ctx.details
    assert len(s.plane.core.calls) == 1
    assert outcomes(s) == {counter: 1} and s.plane.counts["accepted"] == 1


def test_an_exception_in_route_is_internal_with_the_generic_message(make_servicer):
    s = make_servicer(FakeCore(_raise(KeyError(f"worker det-0 at {ADDRESS}:50123"))))
    _, ctx = call(s, request())
    assert ctx.code == grpc.StatusCode.INTERNAL and ctx.details == INTERNAL_MESSAGE


def test_any_message_with_an_address_is_scrubbed(make_servicer, monkeypatch):
    # belt and braces: even a front-door message that would carry an address is replaced
    from services.common.errors import Shed

    s = make_servicer()
    monkeypatch.setattr(plane_mod.oip, "extract_image",
                        lambda *a, **k: (_ for _ in ()).throw(Shed(f"busy at {ADDRESS}:8001")))
    _, ctx = call(s, request())
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ADDRESS not in ctx.details and "over capacity" in ctx.details


def test_counts_add_up_over_a_mix_of_requests(make_servicer):
    s = make_servicer(rate=3.0)
    reqs = [request(), request(model="x"), request(b"junk"), request(timeout_ms=1), request(),
            request(), request()]
    for r in reqs:
        call(s, r)
    assert sum(s.plane.counts[k] for k in OUTCOMES) == len(reqs)
    assert outcomes(s) == {"ok": 3, "not_found": 1, "invalid": 1, "dropped": 1, "shed": 1}
    assert s.plane.counts["received"] == 4 and s.plane.counts["accepted"] == 3


# --------------------------------------------------------------------------- answering before the client's deadline


class HangingCore(FakeCore):
    """A pipeline that never answers; records that its route() was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def route(self, request_id, deadline_s, queries, upstream_path):
        self.calls.append((request_id, deadline_s, list(queries), upstream_path))
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _timed(coro):
    async def go():
        t0 = time.perf_counter()
        await asyncio.wait_for(coro, 10)   # a hang fails the test, not the run
        return time.perf_counter() - t0
    return asyncio.run(go())


def _idle(s) -> bool:
    return (s.plane.inflight_bytes, s.plane.receiving, s.plane.waiting_to_receive) == (0, 0, 0) and not s.plane.gate.policy._active


def test_a_pipeline_that_does_not_answer_is_answered_deadline_exceeded_before_the_deadline(make_servicer):
    core = HangingCore()
    s = make_servicer(core, answer_margin_ms=200)
    ctx = FakeContext(time_remaining=1.0, body=request().SerializeToString())
    elapsed = _timed(_stream(s, ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "while the pipeline was serving it" in ctx.details and "200 ms before it" in ctx.details
    assert elapsed < 1.0                     # answered before the client's deadline
    assert core.cancelled == 1               # the work downstream was cancelled
    [(_, deadline, _, _)] = core.calls
    assert deadline <= time.time() + 0.8     # and worked to the deadline less the margin
    assert outcomes(s) == {"dropped": 1} and s.plane.counts["expired"] == 1 and s.plane.counts["arrived"] == 1
    assert _idle(s)


def test_the_timeout_parameter_moves_the_answer_earlier(make_servicer):
    s = make_servicer(HangingCore())
    ctx = FakeContext(body=request(timeout_ms=300).SerializeToString())   # no gRPC deadline
    elapsed = _timed(_stream(s, ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and "(300 ms after it arrived)" in ctx.details
    assert elapsed < 0.3 and s.plane.counts["expired"] == 1


def test_a_body_that_does_not_arrive_is_answered_before_the_deadline_and_its_slot_freed(make_servicer):
    s = make_servicer()
    ctx = FakeContext(time_remaining=0.5, body=request().SerializeToString(), gate=asyncio.Event())
    elapsed = _timed(_stream(s, ctx))   # the read never ends
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and "while its body was being read" in ctx.details
    assert ctx.reads == 1 and elapsed < 0.5
    assert outcomes(s) == {"dropped": 1} and s.plane.counts["expired"] == 1 and _idle(s)


def test_a_deadline_that_leaves_no_room_for_the_margin_is_dropped_unread(make_servicer):
    s = make_servicer(answer_margin_ms=100)
    ctx = FakeContext(time_remaining=0.11, body=request().SerializeToString())   # 110 - 100 < 20 ms
    asyncio.run(_stream(s, ctx))
    assert ctx.code == grpc.StatusCode.DEADLINE_EXCEEDED and ctx.reads == 0
    assert "the 100 ms the front door keeps to answer in time" in ctx.details
    assert outcomes(s) == {"dropped": 1} and s.plane.counts["expired"] == 0


def test_without_a_margin_the_pipeline_works_to_the_deadline_itself(make_servicer):
    s = make_servicer(answer_margin_ms=0)
    before = time.time()
    call(s, request(), FakeContext(0.4))
    [(_, deadline, _, _)] = s.plane.core.calls
    assert before + 0.4 - 1e-6 <= deadline <= time.time() + 0.4 + 1e-6


def test_a_client_that_goes_away_is_counted_cancelled_once_and_frees_what_it_held(make_servicer):
    core = HangingCore()
    s = make_servicer(core)

    async def scenario():
        task = asyncio.create_task(_stream(s, FakeContext(body=request().SerializeToString())))
        while not core.calls:
            await asyncio.sleep(0.001)
        assert s.plane.inflight_bytes > 0
        task.cancel()                        # what gRPC does when the client cancels
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 30))   # a hang fails, not hangs
    assert outcomes(s) == {"cancelled": 1} and s.plane.counts["arrived"] == 1 and core.cancelled == 1
    assert _idle(s)


def test_every_arrival_is_counted_with_exactly_one_outcome(make_servicer):
    s = make_servicer(rate=3.0)
    reqs = [request(), request(model="x"), request(b"junk"), request(timeout_ms=1), request(),
            request(), request()]
    for r in reqs:
        call(s, r)
    ctx = FakeContext(time_remaining=-1, body=request().SerializeToString())
    asyncio.run(_stream(s, ctx))
    assert s.plane.counts["arrived"] == len(reqs) + 1 == sum(s.plane.counts[k] for k in OUTCOMES)


# --------------------------------------------------------------------------- fair shares


def test_one_clients_large_requests_do_not_shed_another_clients_small_ones(make_servicer):
    core = FakeCore()
    body = request().SerializeToString()
    # one client may hold 2 of these and no third (as in the shared-limit test above)
    s = make_servicer(core, max_inflight_bytes=SPEC.input.max_bytes + int(1.5 * len(body)))

    async def scenario():
        core.gate = asyncio.Event()
        big = [FakeContext(body=body, peer="ipv4:10.0.0.1:5000") for _ in range(3)]
        held = [asyncio.create_task(_stream(s, c)) for c in big[:2]]
        while len(core.calls) < 2:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(_stream(s, big[2]), 10)          # its own third: shed, unread
        other = FakeContext(body=body, peer="ipv4:10.0.0.2:6000")
        served = asyncio.create_task(_stream(s, other))         # another client: read and served
        while len(core.calls) < 3:
            await asyncio.sleep(0.001)
        core.gate.set()
        await asyncio.wait_for(asyncio.gather(*held, served), 10)
        return big, other

    big, other = asyncio.run(asyncio.wait_for(scenario(), 30))   # a hang fails, not hangs
    assert big[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED and big[2].reads == 0
    assert other.code is None and other.reads == 1
    assert outcomes(s) == {"ok": 3, "shed": 1} and _idle(s)


def test_connections_naming_one_client_share_its_share(make_servicer):
    core = FakeCore()
    body = request().SerializeToString()
    s = make_servicer(core, max_inflight_bytes=SPEC.input.max_bytes + int(1.5 * len(body)))
    named = (("x-pipeserve-client", "tenant-a"),)

    async def scenario():
        core.gate = asyncio.Event()
        ctxs = [FakeContext(body=body, peer=f"ipv4:10.0.0.1:{5000 + i}", metadata=named) for i in range(3)]
        held = [asyncio.create_task(_stream(s, c)) for c in ctxs[:2]]
        while len(core.calls) < 2:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(_stream(s, ctxs[2]), 10)   # a third connection, the same client
        core.gate.set()
        await asyncio.wait_for(asyncio.gather(*held), 10)
        return ctxs

    ctxs = asyncio.run(asyncio.wait_for(scenario(), 30))   # a hang fails, not hangs
    assert ctxs[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctxs[2].reads == 0
    assert outcomes(s) == {"ok": 2, "shed": 1}
