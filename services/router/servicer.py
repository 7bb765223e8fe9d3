"""gRPC adapters of the router: the internal Route service, and for the first stage the
Open Inference Protocol v2 front door (model name = pipeline name)."""
from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from google.protobuf.message import DecodeError

from services.common import oip
from services.policy.admission import TokenBucket
from services.common.errors import (DeadlineMissed, InvalidInput, NotFound, ServingError, Shed,
                                    Unavailable)
from services.common.grpc_utils import map_errors
from services.common.logging import get_logger
from services.common.metrics import FrontDoorMetrics
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.core import RouterCore
from services.router.stats import MODEL_VERSION, FrontDoorStats, breakdown, critical_path, critical_path_ms

log = get_logger(__name__)
SERVER_NAME = "pipeserve"
SERVER_VERSION = "0.1.0"


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    @map_errors
    async def Route(self, request: pb.RouteRequest, context) -> pb.RouteResponse:
        if not request.queries:
            raise InvalidInput("no queries in request")
        if request.deadline_unix_s <= 0:
            raise InvalidInput("deadline_unix_s is required")
        results = await self.core.route(request.request_id, request.deadline_unix_s,
                                        list(request.queries), request.upstream_path)
        return pb.RouteResponse(results=results, plan_version=self.core.plan.version if self.core.plan else 0)


def _failure_of(result: pb.QueryResult) -> tuple[int, str] | None:
    """The first non-OK status in a result tree, depth first."""
    if result.status != pb.OK:
        return result.status, result.message or pb.QueryStatus.Name(result.status)
    for c in result.children:
        f = _failure_of(c)
        if f is not None:
            return f
    return None


def _variant_path(result: pb.QueryResult) -> str:
    parts = [result.variant]
    if result.children:
        parts.append("+".join(sorted({c.variant for c in result.children if c.variant})))
    return "/".join(p for p in parts if p)


def has_orientation(spec) -> bool:
    """An ``ocr_lines`` pipeline whose root has a second child: that child classifies each
    line's orientation (pipelines/ocr_tree.yaml: det -> (rec, cls))."""
    return spec.output == "ocr_lines" and len(spec.root.children) > 1


def format_ocr_lines(result: pb.QueryResult, orientation: bool = False) -> list[oip.OcrLine]:
    """One line per detected region: text and confidence from the first child task's
    result, and with ``orientation`` the label and confidence of the second child's
    (``result.children[j * n_regions + i]`` is child task j's result for region i)."""
    lines = []
    n = len(result.regions)
    for i, region in enumerate(result.regions):
        text, conf = ("", 0.0)
        if i < len(result.children) and result.children[i].regions:
            text, conf = result.children[i].regions[0].text, result.children[i].regions[0].confidence
        label, lconf = (None, None)
        if orientation:
            label, lconf = "", 0.0
            if n + i < len(result.children) and result.children[n + i].regions:
                label, lconf = result.children[n + i].regions[0].label, result.children[n + i].regions[0].confidence
        lines.append(oip.OcrLine(text, tuple(region.points), conf, label, lconf))
    return lines


# -- the front door --------------------------------------------------------------------
#
# Messages leave the system here only. What a client reads is written here (or is a
# validation message of services/common/oip.py about its own request); failure messages
# from inside the cluster (they name worker and router addresses) go to the log only.

DEFAULT_MIN_BUDGET_MS = 20.0
"""A request whose deadline leaves less than this is dropped on arrival, before its
payload is looked at: no pipeline we serve answers faster (one detector run alone takes
longer), so admitting it would only spend work on an answer nobody gets."""

INFLIGHT_FACTOR = 3
"""Default cap on the bytes of requests in flight at the front door: this many times the
spec's ``input.max_bytes`` (24 MiB for pipelines/ocr.yaml)."""

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
"""How many of the last request bodies' sizes the waiting rule looks at (their largest)."""

VALIDATION_THREADS = 2
"""Threads that validate raw UINT8 pixels and re-encode them as PNG, off the event loop
(an encoded image's header check is cheaper than a hand-off and runs inline)."""

INTERNAL_MESSAGE = "internal error while serving the request (details in the server log)"
_GENERIC = {
    "DEADLINE_EXCEEDED": "the pipeline could not answer within the request's deadline; dropped",
    "RESOURCE_EXHAUSTED": "the pipeline is over capacity; request shed, retry later",
    "UNAVAILABLE": "a pipeline stage is unavailable; retry later",
    "INVALID_ARGUMENT": "input 'image': the image could not be decoded (corrupt or truncated data)",
    "NOT_FOUND": "unknown model",
}
# what a message that must not reach a client looks like: an address or a traceback
_LEAK = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\]|"
                   r"\b[A-Za-z][\w.-]*:\d{2,5}\b|Traceback|File \"")
_STATUS_CODE = {pb.DROPPED_DEADLINE: "DEADLINE_EXCEEDED", pb.SHED: "RESOURCE_EXHAUSTED",
                pb.INVALID: "INVALID_ARGUMENT", pb.UNAVAILABLE: "UNAVAILABLE"}
_ERROR_OF_CODE = {"DEADLINE_EXCEEDED": DeadlineMissed, "RESOURCE_EXHAUSTED": Shed,
                  "INVALID_ARGUMENT": InvalidInput, "UNAVAILABLE": Unavailable, "NOT_FOUND": NotFound}
_COUNTER_OF_CODE = {"DEADLINE_EXCEEDED": "dropped", "RESOURCE_EXHAUSTED": "shed",
                    "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not_found"}


def _client_error(code: str, stage: str = "") -> ServingError:
    """The generic error a client gets for an internal failure of status ``code``; the
    spec's name of the ``stage`` it happened at, when known, is added (never an address)."""
    cls = _ERROR_OF_CODE.get(code)
    if cls is None or code not in _GENERIC:
        return ServingError(INTERNAL_MESSAGE)
    return cls(_GENERIC[code] + (f" (at stage {stage!r})" if stage and code != "NOT_FOUND" else ""))


def _failed_stage(result: pb.QueryResult) -> str:
    """The task of the first non-OK result in a result tree, depth first."""
    if result.status != pb.OK:
        return result.task
    for c in result.children:
        t = _failed_stage(c)
        if t:
            return t
    return ""


def _cheap_to_check(request: ipb.ModelInferRequest) -> bool:
    """An encoded image (BYTES) is validated from its header alone (a few microseconds,
    less than a thread hand-off); raw UINT8 pixels are re-encoded as PNG (milliseconds)."""
    return all(t.datatype == "BYTES" for t in request.inputs)


def receive_limit_bytes(spec) -> int:
    """gRPC's receive limit for the front door's server: twice the spec's ``max_bytes`` plus
    64 KiB of message overhead. Up to it an oversize image gets INVALID_ARGUMENT naming the
    limit; past it gRPC itself refuses the message (RESOURCE_EXHAUSTED)."""
    return 2 * spec.input.max_bytes + 64 * 1024


class RawInferRequest:
    """A ModelInfer request as it came off the wire. The servicer parses it only after the
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


def add_front_door_to_server(servicer: "FrontDoorServicer", server) -> None:
    """Register the OIP service as the generated ``add_..._to_server`` does, except
    ModelInfer: it is served by :meth:`FrontDoorServicer.ModelInferStream`, a
    stream-unary handler (the same bytes on the wire as a unary call, for any client),
    so that a request can be shed before its body is read."""

    class _Capture:
        def add_generic_rpc_handlers(self, _handlers) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            self.service, self.handlers = service, dict(handlers)

    capture = _Capture()
    ipb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        servicer.ModelInferStream, request_deserializer=RawInferRequest,
        response_serializer=ipb.ModelInferResponse.SerializeToString)
    # the stream's messages are parsed one by one too: a malformed one gets its own error
    # answer instead of ending the stream
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=RawInferRequest,
        response_serializer=ipb.ModelStreamInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class FrontDoorServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """OIP v2. A request's absolute deadline = the earliest of its gRPC deadline, its
    ``timeout`` parameter (ms) and the pipeline SLO. Every request ends in one answer: the
    result, or DEADLINE_EXCEEDED (dropped), RESOURCE_EXHAUSTED (shed), INVALID_ARGUMENT,
    NOT_FOUND, UNAVAILABLE or INTERNAL.

    The checks, cheapest first, so that a request that cannot be served costs little:

    1. before the body is read: an expired gRPC deadline (DEADLINE_EXCEEDED); no room in
       flight for one more request of the largest allowed size (the requests in flight
       hold more than ``max_inflight_bytes - max_bytes``), or ``max_receiving`` bodies
       are being read already and the recent bodies were large or too many wait already
       (RESOURCE_EXHAUSTED); a wait for a slot that outlasts the deadline
       (DEADLINE_EXCEEDED);
    2. once read: its size would take the bytes in flight past ``max_inflight_bytes``
       (RESOURCE_EXHAUSTED); not a ModelInferRequest (INVALID_ARGUMENT); unknown model
       (NOT_FOUND); the deadline leaves less than ``min_budget_ms`` (DEADLINE_EXCEEDED,
       before the payload is validated);
    3. payload validation and UINT8 re-encoding, in a thread (INVALID_ARGUMENT);
       readiness (UNAVAILABLE); the admission rate (RESOURCE_EXHAUSTED);
    4. routing; a failure inside becomes a generic message of its status.

    A request arriving when nothing is in flight is always read, whatever its size.

    ``counts``: ``received`` (valid requests, admitted or shed by admission control: the
    demand the controller plans for) and ``accepted`` (routed) count progress; exactly one
    of ``ok``, ``dropped``, ``shed``, ``invalid``, ``not_found``, ``failed``, ``cancelled``
    counts each request's outcome. ``stats`` keeps Triton's statistics of the model
    (services/router/stats.py), served by ModelStatistics.

    Triton's extensions for perf_analyzer and Triton clients: ModelConfig (the pipeline
    as one model of version "1", ``oip.model_config``), ModelStatistics, RepositoryIndex
    and ModelStreamInfer (each request on the stream gets exactly one answer, in the order
    they finish: its response, or ``error_message`` = "CODE: message" with the request's
    id in ``infer_response``). A request that names outputs gets those only."""

    def __init__(self, core: RouterCore, admission: TokenBucket, *,
                 min_budget_ms: float = DEFAULT_MIN_BUDGET_MS,
                 max_inflight_bytes: int | None = None,
                 max_receiving: int = MAX_RECEIVING,
                 max_waiting_to_receive: int = MAX_WAITING_TO_RECEIVE,
                 validation_threads: int = VALIDATION_THREADS) -> None:
        self.core = core
        self.spec = core.spec
        self.orientation = has_orientation(self.spec)   # the answer carries line orientations
        self.admission = admission
        self.min_budget_s = min_budget_ms / 1e3
        self.max_inflight_bytes = (max_inflight_bytes if max_inflight_bytes is not None
                                   else INFLIGHT_FACTOR * self.spec.input.max_bytes)
        self.max_receiving = max_receiving
        self.max_waiting_to_receive = max_waiting_to_receive
        self.inflight_bytes = 0   # requests read and not answered yet
        self.receiving = 0        # request bodies being read
        self._waiting: deque[asyncio.Future] = deque()   # arrivals waiting for a slot to read
        self._recent_sizes: deque[int] = deque(maxlen=RECENT_BODIES)
        self._pool = ThreadPoolExecutor(max_workers=validation_threads,
                                        thread_name_prefix="frontdoor-validate")
        self.counts = {"received": 0, "accepted": 0, "ok": 0, "dropped": 0, "shed": 0, "invalid": 0,
                       "not_found": 0, "failed": 0, "cancelled": 0}
        self.stats = FrontDoorStats()
        self.metrics = FrontDoorMetrics(self)   # counts and bytes in flight read when scraped

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting_to_receive(self) -> int:
        """Arrivals waiting for a slot to read their body."""
        return len(self._waiting)

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.spec.name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.spec.name!r}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version "
                           f"{MODEL_VERSION!r}")

    async def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=self.core.ready())

    @map_errors
    async def ModelReady(self, request, context):
        self._check_model(request.name)
        return ipb.ModelReadyResponse(ready=self.core.ready())

    async def ServerMetadata(self, request, context):
        return ipb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                          extensions=["model_configuration", "statistics"])

    @map_errors
    async def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        return oip.model_metadata(self.spec.name, versions=[MODEL_VERSION], orientation=self.orientation)

    @map_errors
    async def ModelConfig(self, request, context):
        """The pipeline as Triton's model configuration; its parameters say what the
        model is (the pipeline's stages, SLO and output format)."""
        self._check_model(request.name, request.version)
        stages = " -> ".join(f"{t.name}[{', '.join(v.name for v in t.variants)}]"
                             for t in self.spec.tasks)
        return ipb.ModelConfigResponse(config=oip.model_config(
            self.spec.name, version=MODEL_VERSION,
            parameters={"pipeline": self.spec.name, "stages": stages,
                        "slo_ms": f"{self.spec.slo_ms:g}", "output": self.spec.output},
            orientation=self.orientation))

    @map_errors
    async def ModelStatistics(self, request, context):
        """The model's cumulative statistics (FrontDoorStats); an empty name or version
        means all (the one model, the one version)."""
        if request.name:
            self._check_model(request.name, request.version)
        elif request.version not in ("", MODEL_VERSION):
            return ipb.ModelStatisticsResponse()
        return ipb.ModelStatisticsResponse(model_stats=[self.stats.proto(self.spec.name)])

    @map_errors
    async def RepositoryIndex(self, request, context):
        """The one model: READY when the plan has workers for every stage, else
        UNAVAILABLE with the reason (left out with ``ready``)."""
        if request.repository_name:
            raise NotFound(f"unknown model repository {request.repository_name!r}; this server "
                           "has one unnamed repository")
        ready = self.core.ready()
        if request.ready and not ready:
            return ipb.RepositoryIndexResponse()
        entry = ipb.RepositoryIndexResponse.ModelIndex(
            name=self.spec.name, version=MODEL_VERSION, state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else "no plan with workers for every stage yet")
        return ipb.RepositoryIndexResponse(models=[entry])

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference: requests are served concurrently as they arrive,
        each with the same checks as ModelInfer, and each gets exactly one answer on the
        stream as it finishes (a client matches them by ``id``). A failed request's answer
        has ``error_message`` "CODE: message" (the gRPC status code name it would have had
        on ModelInfer) and the request's id and model in ``infer_response``, where known.
        The stream ends once the client has closed its side and every answer is sent."""
        answers: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(request) -> None:
            answers.put_nowait(await self._stream_answer(request, context))

        async def pump() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(pump())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader   # re-raises what ended the reading, if anything did
        finally:
            for task in (reader, *tasks):
                task.cancel()

    async def _stream_answer(self, request, context) -> ipb.ModelStreamInferResponse:
        async def read():
            return request
        note: dict = {}
        try:
            return ipb.ModelStreamInferResponse(infer_response=await self._answer(read, context, note))
        except ServingError as exc:
            return ipb.ModelStreamInferResponse(
                error_message=f"{exc.code}: {exc}",
                infer_response=ipb.ModelInferResponse(model_name=note.get("model", ""),
                                                      model_version=note.get("version", ""),
                                                      id=note.get("id", "")))

    @map_errors
    async def ModelInfer(self, request, context) -> ipb.ModelInferResponse:
        """Unary form: ``request`` is a parsed ModelInferRequest or a RawInferRequest."""
        async def read():
            return request
        return await self._answer(read, context)

    @map_errors
    async def ModelInferStream(self, request_iterator, context) -> ipb.ModelInferResponse:
        """What :func:`add_front_door_to_server` serves ModelInfer with: the body is read
        (``context.read()``) only once the checks before reading have passed."""
        async def read():
            message = await context.read()
            if message is grpc.aio.EOF:
                raise InvalidInput("the call carried no request message")
            return message
        return await self._answer(read, context)

    async def _answer(self, read, context, note: dict | None = None) -> ipb.ModelInferResponse:
        """One request to its one answer, counted once (``counts`` and ``stats``); messages
        to the client scrubbed. ``note`` gets the request's ``id``, ``model`` and
        ``version`` once it is parsed, and once answered its critical ``path`` (queue, batch
        ms) and the front door's own ``input_ns`` and ``output_ns`` (FrontDoorStats)."""
        note = {} if note is None else note
        t0 = time.perf_counter_ns()
        note["t0_ns"] = t0
        try:
            response = await self._model_infer(read, context, note)
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
            if _LEAK.search(message):   # never an address or a traceback to a client
                log.error("request_error_message_scrubbed", code=exc.code, message=message)
                raise _client_error(exc.code) from None
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
        if budget_s < self.min_budget_s:
            left = ("has already passed" if budget_s <= 0 else
                    f"leaves {budget_s * 1e3:.0f} ms, less than the {self.min_budget_s * 1e3:.0f} ms "
                    "the pipeline needs at least")
            raise DeadlineMissed(f"the request's deadline {left}; dropped {when}")

    def _busy(self, what: str) -> Shed:
        return Shed(f"server busy: {what} (limit {self.max_inflight_bytes / 2**20:.1f} MiB of "
                    "requests in flight); retry later")

    async def _model_infer(self, read, context, note: dict) -> ipb.ModelInferResponse:
        now = time.time()
        grpc_left = context.time_remaining()
        if grpc_left is not None and grpc_left <= 0:   # expired: not even read
            self._check_budget(grpc_left, "on arrival")
        room = self.max_inflight_bytes - self.spec.input.max_bytes
        if self.inflight_bytes > 0 and self.inflight_bytes > room:
            raise self._busy(f"{self.inflight_bytes / 2**20:.1f} MiB of requests in flight and "
                             f"{self.receiving} being received")
        await self._receive_slot(grpc_left)
        try:
            request = await read()
            raw = request if isinstance(request, RawInferRequest) else None
            size = raw.size if raw is not None else request.ByteSize()
            self._recent_sizes.append(size)
        finally:
            self._release_slot()
        if self.inflight_bytes > 0 and self.inflight_bytes + size > self.max_inflight_bytes:
            raise self._busy(f"{self.inflight_bytes / 2**20:.1f} MiB of requests in flight, this "
                             f"one ({size / 2**20:.1f} MiB) would pass the limit")
        self.inflight_bytes += size
        try:
            message = raw.parse() if raw is not None else request
            request_id = message.id or uuid.uuid4().hex[:16]
            note.update(id=message.id, model=message.model_name, version=message.model_version)
            structlog.contextvars.bind_contextvars(request_id=request_id)
            self._check_model(message.model_name, message.model_version)
            budget_s = self.spec.slo_ms / 1e3
            timeout_ms = oip.request_timeout_ms(message)
            if timeout_ms is not None:
                budget_s = min(budget_s, timeout_ms / 1e3)
            if grpc_left is not None:
                budget_s = min(budget_s, grpc_left)   # both relative to arrival (now)
            self._check_budget(budget_s, "on arrival")
            held = [message]   # _serve lets go of it once validated: only the image stays
            del message
            return await self._serve(held, raw, request_id, now, now + budget_s, note)
        finally:
            self.inflight_bytes -= size

    async def _receive_slot(self, grpc_left: float | None) -> None:
        """Take one of the ``max_receiving`` slots to read a body, waiting for one when the
        recent bodies were small (MAX_WAITING_TO_RECEIVE); raises Shed or DeadlineMissed."""
        if self.receiving < self.max_receiving and not self._waiting:
            self.receiving += 1
            return
        budget_s = self.spec.slo_ms / 1e3 if grpc_left is None else min(self.spec.slo_ms / 1e3, grpc_left)
        wait_s = budget_s - self.min_budget_s
        if wait_s <= 0 or len(self._waiting) >= self.max_waiting_to_receive or not self._may_wait():
            raise self._busy(f"{self.inflight_bytes / 2**20:.1f} MiB of requests in flight and "
                             f"{self.receiving} being received")
        loop = asyncio.get_running_loop()
        slot = loop.create_future()   # its result: "granted", "expired" or "shed"
        self._waiting.append(slot)
        timer = loop.call_later(wait_s, lambda: slot.done() or slot.set_result("expired"))
        try:
            outcome = await slot
        except BaseException:         # cancelled (the client went away)
            if slot.done() and not slot.cancelled() and slot.result() == "granted":
                self._release_slot()  # handed a slot as it was cancelled: pass it on
            raise
        finally:
            timer.cancel()
            if slot in self._waiting:
                self._waiting.remove(slot)
        if outcome == "expired":
            raise DeadlineMissed(f"the request's deadline passed while it waited for one of the "
                                 f"{self.max_receiving} slots to read its body; dropped before it "
                                 "was read")
        if outcome == "shed":
            raise self._busy(f"large requests arrived while it waited to be read; "
                             f"{self.inflight_bytes / 2**20:.1f} MiB of requests in flight")

    def _may_wait(self) -> bool:
        """Whether an arrival may wait for a read slot: the bodies being read and waiting,
        and its own, at WAIT_HEADROOM times the largest recent one, fit in the room left in
        flight (MAX_WAITING_TO_RECEIVE)."""
        largest = WAIT_HEADROOM * max(self._recent_sizes, default=self.spec.input.max_bytes)
        bodies = self.receiving + len(self._waiting) + 1
        return bodies * largest <= self.max_inflight_bytes - self.inflight_bytes

    def _release_slot(self) -> None:
        """A body is read (or its read failed): its slot goes to the first arrival waiting."""
        if self._waiting and not self._may_wait():
            # large bodies now: the arrivals waiting are shed, unread, as new ones would be
            while self._waiting:
                slot = self._waiting.popleft()
                if not slot.done():
                    slot.set_result("shed")
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result("granted")   # the slot passes on: ``receiving`` stays
                return
        self.receiving -= 1

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
        try:
            [result] = await self.core.route(request_id, deadline, queries, "")
        except ServingError as exc:
            log.warning("route_failed", code=exc.code, detail=str(exc))
            raise _client_error(exc.code if exc.code != "INVALID_ARGUMENT" else "INTERNAL") from None
        t_output = time.perf_counter_ns()
        route_ns = t_output - t_route
        failure = _failure_of(result)
        if failure is not None:
            status, message = failure
            code = _STATUS_CODE.get(status, "INTERNAL")
            if code == "INVALID_ARGUMENT" and result.status == pb.OK:
                code = "INTERNAL"   # a crop we made was rejected: our fault, not the client's
            (log.error if code == "INTERNAL" else log.info)(
                "request_failed_inside", status=pb.QueryStatus.Name(status), detail=message)
            raise _client_error(code, _failed_stage(result))
        latency_ms = (time.time() - now) * 1e3
        self.metrics.answered(latency_ms / 1e3)
        plan_version = self.core.plan.version if self.core.plan else 0
        path = _variant_path(result)
        log.debug("request_done", latency_ms=round(latency_ms, 1), regions=len(result.regions),
                  plan_version=plan_version, variant_path=path)
        params = {"plan_version": plan_version, "variant_path": path}
        if self.spec.output == "ocr_lines":
            lines = format_ocr_lines(result, self.orientation)
        else:
            lines = [oip.OcrLine(r.label or r.text, tuple(r.points) if len(r.points) == 8 else (0.0,) * 8,
                                 r.score) for r in result.regions]
        response = oip.build_ocr_response(self.spec.name, request_id, lines, params, outputs,
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
