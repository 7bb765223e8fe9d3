"""The front door's request pipeline, without gRPC: one Open Inference Protocol v2 request
(model name = pipeline name) from its arrival to its one answer. The checks before its
body is read, the receive gate, the deadline timer and its answer, validation, readiness,
admission, the pipeline call (RouterCore.route) and the answer's formatting are here;
services/router/servicer.py is the gRPC adapter over it (KServe's servicer over its
``DataPlane`` is the model)."""
from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import structlog
from google.protobuf.message import DecodeError

from services.common import oip
from services.common.errors import DeadlineMissed, InvalidInput, NotFound, ServingError, Shed, Unavailable
from services.common.logging import get_logger
from services.common.metrics import FrontDoorMetrics
from services.gen import inference_pb2 as ipb
from services.gen import pipeserve_pb2 as pb
from services.policy.admission import TokenBucket
from services.policy.fairness import ShareLimits
from services.router.core import RouterCore
from services.router.frontdoor_gate import ReceiveGate
from services.router.frontdoor_results import (INTERNAL_MESSAGE, LEAK, answer_lines, client_error,
                                               failure_error, has_orientation, variant_path)
from services.router.stats import MODEL_VERSION, FrontDoorStats, breakdown, critical_path, critical_path_ms

log = get_logger(__name__)

DEFAULT_MIN_BUDGET_MS = 20.0
"""A request whose deadline leaves less than this is dropped on arrival, before its
payload is looked at: no pipeline we serve answers faster (one detector run alone takes
longer), so admitting it would only spend work on an answer nobody gets."""

DEFAULT_ANSWER_MARGIN_MS = 50.0
"""The front door answers this long before a request's deadline when it cannot finish it
in time (DEADLINE_EXCEEDED, counted ``dropped`` and ``expired``), and works to a deadline
this much earlier (the deadline it passes downstream), so that its answer reaches the
client before the client's own gRPC deadline fires (then the client would see gRPC's
"Deadline Exceeded" and the front door a cancelled call). Tens of milliseconds: more
than the answer's trip back and the event loop's lag under load."""

INFLIGHT_FACTOR = 4
"""Default cap on the bytes of requests in flight at the front door: this many times the
spec's ``input.max_bytes`` (32 MiB for pipelines/ocr.yaml). With one client a body is read
while there is room for one more of the largest allowed size: 24 MiB, ~21 OCR pages of 1.1 MB.
At 3x (24 MiB, room for ~15 pages) a busy 2-core host shed pages at 11-13 req/s, well below
what its workers carried, whenever latency neared the SLO (tests/integration/test_elastic_pool.py
beside a busy core: 7 and 9 shed; the Twitter peak of the fidelity check: 17)."""

MAX_RECEIVING = 8
"""At most this many request bodies are read at the same time. More arrivals at once wait
for a slot when the recent bodies were small (``MAX_WAITING_TO_RECEIVE``), else they are
shed before their bodies are read."""

MAX_WAITING_TO_RECEIVE = 16
"""How many arrivals may wait for a slot to read their body, each until its deadline
leaves less than ``min_budget_ms``. Waiting is allowed while the bodies being read and
waiting, at ``WAIT_HEADROOM`` times the largest of the last ``RECENT_BODIES``, would fit
in the room left in flight: a burst of small requests (16 callers of 1 KB or 200 KB
images) then waits a few hundred microseconds instead of being shed, and a burst of large
ones is shed at once as before (reading them late would only hold their bytes longer).
Waiting holds no body, but gRPC's transport buffers what a waiting stream's client sends
meanwhile (flow-control windows, up to megabytes per stream), so the number waiting is
capped, and the headroom keeps a burst of bodies larger than the recent ones from waiting."""

WAIT_HEADROOM = 4
"""How much larger than the largest recent body the bodies read and waiting are assumed to
be when deciding whether an arrival may wait for a read slot (MAX_WAITING_TO_RECEIVE)."""

RECENT_BODIES = 16
"""How many of a client's last request bodies' sizes the waiting rule looks at (their largest)."""

VALIDATION_THREADS = 2
"""Threads that validate raw UINT8 pixels and re-encode them as PNG, off the event loop
(an encoded image's header check is cheaper than a hand-off and runs inline)."""

_COUNTER_OF_CODE = {"DEADLINE_EXCEEDED": "dropped", "RESOURCE_EXHAUSTED": "shed",
                    "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not_found"}


def _cheap_to_check(request: ipb.ModelInferRequest) -> bool:
    """An encoded image (BYTES) is validated from its header alone (a few microseconds,
    less than a thread hand-off); raw UINT8 pixels are re-encoded as PNG (milliseconds)."""
    return all(t.datatype == "BYTES" for t in request.inputs)


class RawInferRequest:
    """A ModelInfer request as it came off the wire. The data plane parses it only after the
    checks that need no parsing; random bytes then get INVALID_ARGUMENT, not gRPC's UNKNOWN
    with a parser exception."""

    __slots__ = ("data", "size")

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data
        self.size = len(data)

    def parse(self) -> ipb.ModelInferRequest:
        try:
            return ipb.ModelInferRequest.FromString(self.data)
        except DecodeError:
            raise InvalidInput("the request body is not a valid ModelInferRequest protobuf "
                               "message") from None

    def release(self) -> None:
        self.data = None


class FrontDoorPlane:
    """The front door's data plane: OIP v2 requests in, their answers out, no gRPC. The
    adapter hands :meth:`infer` a coroutine that reads the request's body, the client it
    counts for and the time left before its gRPC deadline; every failure is raised as a
    ServingError (services/common/errors.py) whose code is the status to answer with.

    A request's absolute deadline = the earliest of its gRPC deadline, its ``timeout``
    parameter (ms) and the pipeline SLO. Every request ends in one answer: the result, or
    DEADLINE_EXCEEDED (dropped), RESOURCE_EXHAUSTED (shed), INVALID_ARGUMENT, NOT_FOUND,
    UNAVAILABLE or INTERNAL.

    **It answers before the client gives up.** The request is served to its deadline less
    ``answer_margin_ms`` (the deadline passed downstream); when that comes and the request
    is not answered yet, wherever it is (waiting for a read slot, its body being read,
    validated, or in the pipeline, whose calls are then cancelled), the front door answers
    DEADLINE_EXCEEDED itself (counted ``dropped`` and ``expired``), so that a live server's
    answer reaches the client before the client's own deadline fires.

    **Fair shares of its receive limits** (services/policy/fairness.py through
    services/router/frontdoor_gate.py): the bytes in flight and the bodies read at once are
    split among the clients sending (``x-pipeserve-client`` metadata, else the connection):
    a client's burst of large uploads sheds that client's own requests, not another's.

    The checks, cheapest first, so that a request that cannot be served costs little:

    1. before the body is read: a deadline that has passed or leaves less than
       ``min_budget_ms`` after the margin (DEADLINE_EXCEEDED); no room in the client's
       share of the bytes in flight for one more request of the largest allowed size, or
       no read slot in its share and its recent bodies were large or too many wait
       already (RESOURCE_EXHAUSTED); a wait for a slot that outlasts the deadline
       (DEADLINE_EXCEEDED);
    2. once read: its size would take the client's bytes in flight past its share
       (RESOURCE_EXHAUSTED); not a ModelInferRequest (INVALID_ARGUMENT); unknown model
       (NOT_FOUND); the ``timeout`` parameter leaves less than ``min_budget_ms``
       (DEADLINE_EXCEEDED, before the payload is validated);
    3. payload validation and UINT8 re-encoding, in a thread (INVALID_ARGUMENT);
       readiness (UNAVAILABLE); the admission rate (RESOURCE_EXHAUSTED);
    4. routing; a failure inside becomes a generic message of its status.

    A request of a client with nothing in flight is always read, whatever its size.

    ``counts``: ``arrived`` (every request, counted as it arrives), ``received`` (valid
    requests, admitted or shed by admission control: the demand the controller plans for)
    and ``accepted`` (routed) count progress; exactly one of ``ok``, ``dropped``, ``shed``,
    ``invalid``, ``not_found``, ``failed``, ``cancelled`` (the client cancelled, or its
    deadline fired first) counts each request's outcome, so once none is in progress
    ``arrived`` is their sum; ``expired`` counts the drops of the deadline timer (of
    ``dropped``). ``stats`` keeps Triton's statistics of the model
    (services/router/stats.py), served by ModelStatistics."""

    def __init__(self, core: RouterCore, admission: TokenBucket, *,
                 min_budget_ms: float = DEFAULT_MIN_BUDGET_MS,
                 max_inflight_bytes: int | None = None,
                 max_receiving: int = MAX_RECEIVING,
                 max_waiting_to_receive: int = MAX_WAITING_TO_RECEIVE,
                 answer_margin_ms: float = DEFAULT_ANSWER_MARGIN_MS,
                 validation_threads: int = VALIDATION_THREADS) -> None:
        self.core = core
        self.spec = core.spec
        self.orientation = has_orientation(self.spec)   # the answer carries line orientations
        self.admission = admission
        self.min_budget_s = min_budget_ms / 1e3
        self.margin_s = answer_margin_ms / 1e3
        self.max_inflight_bytes = (max_inflight_bytes if max_inflight_bytes is not None
                                   else INFLIGHT_FACTOR * self.spec.input.max_bytes)
        self.gate = ReceiveGate(ShareLimits(
            self.max_inflight_bytes, self.spec.input.max_bytes, max_receiving, max_waiting_to_receive,
            wait_headroom=WAIT_HEADROOM, recent_bodies=RECENT_BODIES))
        self._pool = ThreadPoolExecutor(max_workers=validation_threads,
                                        thread_name_prefix="frontdoor-validate")
        self.counts = {"arrived": 0, "received": 0, "accepted": 0, "ok": 0, "dropped": 0, "shed": 0,
                       "invalid": 0, "not_found": 0, "failed": 0, "cancelled": 0, "expired": 0}
        self.stats = FrontDoorStats()
        self.metrics = FrontDoorMetrics(self)   # counts and bytes in flight read when scraped

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def inflight_bytes(self) -> int:
        """Bytes of requests read and not answered yet."""
        return self.gate.inflight_bytes

    @property
    def receiving(self) -> int:
        """Request bodies being read."""
        return self.gate.receiving

    @property
    def waiting_to_receive(self) -> int:
        """Arrivals waiting for a slot to read their body."""
        return self.gate.waiting

    def ready(self) -> bool:
        """Whether the plan has workers for every stage (a request is served only then)."""
        return self.core.ready()

    def check_model(self, name: str, version: str = "") -> None:
        """NotFound unless ``name`` and ``version`` ("" = any) name the one model served."""
        if name != self.spec.name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.spec.name!r}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version "
                           f"{MODEL_VERSION!r}")

    async def infer(self, read: Callable[[], Awaitable[ipb.ModelInferRequest | RawInferRequest]],
                    client: str, time_remaining: float | None,
                    note: dict | None = None) -> ipb.ModelInferResponse:
        """One request to its one answer, counted once (``counts`` and ``stats``); messages
        to the client scrubbed. ``read()`` gives the request (parsed or as it came off the
        wire), called once the checks before reading have passed; ``client``: who it counts
        for in the receive gate's fair shares (frontdoor_gate.client_of); ``time_remaining``:
        seconds to its gRPC deadline, None without one. ``note`` gets the request's ``id``, ``model`` and
        ``version`` once it is parsed, and once answered its critical ``path`` (queue, batch
        ms) and the front door's own ``input_ns`` and ``output_ns`` (FrontDoorStats)."""
        note = {} if note is None else note
        self.counts["arrived"] += 1
        t0 = time.perf_counter_ns()
        note["t0_ns"] = t0
        try:
            response = await self._model_infer(read, client, time_remaining, note)
            self.counts["ok"] += 1
            queue_ms, service_ms = note.get("path", (0.0, 0.0))
            self.stats.record_success(time.perf_counter_ns() - t0, queue_ms, service_ms,
                                      note.get("input_ns", 0), note.get("output_ns", 0))
            return response
        except ServingError as exc:
            self.counts[_COUNTER_OF_CODE.get(exc.code, "failed")] += 1
            if exc.code != "NOT_FOUND":   # a request for another model is not this one's
                self.stats.record_failure(time.perf_counter_ns() - t0)
            message = str(exc)
            if LEAK.search(message):   # never an address or a traceback to a client
                log.error("request_error_message_scrubbed", code=exc.code, message=message)
                raise client_error(exc.code) from None
            log.info("request_failed", code=exc.code, reason=message)
            raise
        except asyncio.CancelledError:
            self.counts["cancelled"] += 1
            self.stats.record_failure(time.perf_counter_ns() - t0)
            raise
        except Exception:
            self.counts["failed"] += 1
            self.stats.record_failure(time.perf_counter_ns() - t0)
            log.exception("request_internal_error")
            raise ServingError(INTERNAL_MESSAGE) from None
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    def _check_budget(self, budget_s: float, when: str) -> None:
        """Drop a request whose deadline, ``budget_s`` from now, leaves less than
        ``min_budget_ms`` once the answer margin is taken off."""
        if budget_s - self.margin_s < self.min_budget_s:
            left = ("has already passed" if budget_s <= 0 else
                    f"leaves {budget_s * 1e3:.0f} ms, less than the {self.min_budget_s * 1e3:.0f} ms "
                    "the pipeline needs at least"
                    + (f" and the {self.margin_s * 1e3:.0f} ms the front door keeps to answer in time"
                       if self.margin_s > 0 else ""))
            raise DeadlineMissed(f"the request's deadline {left}; dropped {when}")

    async def _model_infer(self, read, client: str, grpc_left: float | None,
                           note: dict) -> ipb.ModelInferResponse:
        """The request under its deadline timer: ``answer_margin_ms`` before the earliest
        of its gRPC deadline and the SLO, moved earlier once its ``timeout`` parameter is
        read; when it fires, whatever the request is waiting for is cancelled and it is
        answered DEADLINE_EXCEEDED (counted ``expired``)."""
        now = time.time()
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        budget_s = self.spec.slo_ms / 1e3 if grpc_left is None else min(self.spec.slo_ms / 1e3, grpc_left)
        self._check_budget(budget_s, "on arrival")   # before the body is read
        note["phase"] = "waiting for a slot to read its body"
        timer = asyncio.timeout_at(arrived + budget_s - self.margin_s)
        try:
            async with timer:
                return await self._within(read, client, note, now, arrived, budget_s, timer)
        except TimeoutError:
            if not timer.expired():
                raise   # not the timer's: an error like any other
            self.counts["expired"] += 1
            raise DeadlineMissed(
                f"the request's deadline ({note.get('budget_ms', budget_s * 1e3):.0f} ms after it "
                f"arrived) came while {note['phase']}; dropped {self.margin_s * 1e3:.0f} ms before it, "
                "so that the answer reaches the client in time") from None

    async def _within(self, read, client: str, note: dict, now: float, arrived: float, budget_s: float,
                      timer: asyncio.Timeout) -> ipb.ModelInferResponse:
        """``now`` (wall clock) and ``arrived`` (the loop's clock): when it arrived;
        ``budget_s``: its deadline from then, as known before its body is read."""
        ticket = await self.gate.enter(client, timer.when() - self.min_budget_s)
        try:
            note["phase"] = "its body was being read"
            request = await read()
            raw = request if isinstance(request, RawInferRequest) else None
            size = raw.size if raw is not None else request.ByteSize()
            self.gate.body_read(ticket, size)   # Shed when it would pass the client's share
            note["phase"] = "it was being checked"
            message = raw.parse() if raw is not None else request
            request_id = message.id or uuid.uuid4().hex[:16]
            note.update(id=message.id, model=message.model_name, version=message.model_version)
            structlog.contextvars.bind_contextvars(request_id=request_id)
            self.check_model(message.model_name, message.model_version)
            timeout_ms = oip.request_timeout_ms(message)
            if timeout_ms is not None and timeout_ms / 1e3 < budget_s:
                budget_s = timeout_ms / 1e3      # relative to arrival, as the others
                self._check_budget(budget_s, "on arrival")
                timer.reschedule(arrived + budget_s - self.margin_s)
            note["budget_ms"] = budget_s * 1e3
            held = [message]   # _serve lets go of it once validated: only the image stays
            del message
            return await self._serve(held, raw, request_id, now, now + budget_s, note)
        finally:
            self.gate.leave(ticket)

    async def _serve(self, held: list, raw: "RawInferRequest | None", request_id: str, now: float,
                     deadline: float, note: dict) -> ipb.ModelInferResponse:
        message = held.pop()
        outputs = oip.requested_outputs(message, self.orientation)   # before routing: a wrong name costs no run
        timing = oip.request_wants_timing(message)
        check = functools.partial(oip.extract_image, message, max_bytes=self.spec.input.max_bytes,
                                  max_side=self.spec.input.max_side, max_pixels=self.spec.input.max_pixels)
        del message
        t_input = time.perf_counter_ns()
        if _cheap_to_check(check.args[0]):
            image = check()   # an encoded image: its header is read by hand, microseconds
        else:                 # raw pixels are re-encoded: a thread, off the event loop
            image = await asyncio.get_running_loop().run_in_executor(self._pool, check)
        note["input_ns"] = time.perf_counter_ns() - t_input
        if raw is not None:
            raw.release()   # the request's bytes are let go (and stay counted in flight)
        queries = [pb.Query(query_id=request_id, payload=image)]
        del image           # from here on only the query holds the page
        self.counts["received"] += 1
        if not self.core.ready():
            raise Unavailable(f"no plan yet: the controller publishes one once every stage "
                              f"({', '.join(self.spec.task_names())}) has a worker (`pipeserve status` "
                              f"says which is missing); retry later")
        if not self.admission.admit(now):
            raise Shed(f"over the admission rate of {self.admission.rate:.1f} requests/s; retry later")
        self._check_budget(deadline - time.time(), "before routing")
        self.counts["accepted"] += 1
        t_route = time.perf_counter_ns()
        note["phase"] = "the pipeline was serving it"
        try:   # the pipeline works to the deadline less the margin; the timer cancels it then
            [result] = await self.core.route(request_id, deadline - self.margin_s, queries, "")
        except ServingError as exc:
            log.warning("route_failed", code=exc.code, detail=str(exc))
            raise client_error(exc.code if exc.code != "INVALID_ARGUMENT" else "INTERNAL") from None
        t_output = time.perf_counter_ns()
        route_ns = t_output - t_route
        error = failure_error(result)
        if error is not None:
            raise error
        latency_ms = (time.time() - now) * 1e3
        self.metrics.answered(latency_ms / 1e3)
        plan_version = self.core.plan.version if self.core.plan else 0
        path = variant_path(result)
        log.debug("request_done", latency_ms=round(latency_ms, 1), regions=len(result.regions),
                  plan_version=plan_version, variant_path=path)
        params = {"plan_version": plan_version, "variant_path": path}
        response = oip.build_ocr_response(self.spec.name, request_id, answer_lines(self.spec, result, self.orientation),
                                          params, outputs,
                                          orientation=self.orientation)
        response.model_version = MODEL_VERSION
        t_end = time.perf_counter_ns()
        note["output_ns"] = t_end - t_output
        path = critical_path(result)
        note["path"] = critical_path_ms(path)
        times = breakdown(path, (t_end - note.get("t0_ns", t_route)) / 1e6, route_ns / 1e6,
                          note["input_ns"] / 1e6, note["output_ns"] / 1e6, stages=timing)
        self.metrics.phases(times["phases_ms"], times["unaccounted_ms"])
        if timing:
            response.parameters[oip.TIMING_PARAM].string_param = json.dumps(times, separators=(",", ":"))
        return response
