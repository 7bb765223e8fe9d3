"""gRPC adapters of the router: the internal Route service, and for the first stage the
Open Inference Protocol v2 front door (model name = pipeline name)."""
from __future__ import annotations

import time
import uuid

import structlog

from services.common import oip
from services.policy.admission import TokenBucket
from services.common.errors import (DeadlineMissed, InvalidInput, NotFound, ServingError, Shed,
                                    Unavailable)
from services.common.grpc_utils import map_errors
from services.common.logging import get_logger
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.core import RouterCore

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


_FAILURE_ERRORS = {
    pb.DROPPED_DEADLINE: DeadlineMissed,
    pb.SHED: Shed,
    pb.INVALID: InvalidInput,
    pb.UNAVAILABLE: Unavailable,
}


def _variant_path(result: pb.QueryResult) -> str:
    parts = [result.variant]
    if result.children:
        parts.append("+".join(sorted({c.variant for c in result.children if c.variant})))
    return "/".join(p for p in parts if p)


def format_ocr_lines(result: pb.QueryResult) -> list[oip.OcrLine]:
    lines = []
    for region, child in zip(result.regions, result.children):
        text, conf = ("", 0.0)
        if child.regions:
            text, conf = child.regions[0].text, child.regions[0].confidence
        lines.append(oip.OcrLine(text, tuple(region.points), conf))
    return lines


class FrontDoorServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """OIP v2. A request's absolute deadline = the earliest of its gRPC deadline, its
    ``timeout`` parameter (ms) and the pipeline SLO. Every accepted request ends in one
    answer: the result, or DEADLINE_EXCEEDED (dropped), RESOURCE_EXHAUSTED (shed),
    INVALID_ARGUMENT, UNAVAILABLE or INTERNAL."""

    def __init__(self, core: RouterCore, admission: TokenBucket) -> None:
        self.core = core
        self.spec = core.spec
        self.admission = admission
        # "received": valid requests, admitted or shed: the demand the controller plans for
        self.counts = {"received": 0, "accepted": 0, "ok": 0, "dropped": 0, "shed": 0, "invalid": 0,
                       "failed": 0}

    def _check_model(self, name: str) -> None:
        if name != self.spec.name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.spec.name!r}")

    async def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=self.core.ready())

    @map_errors
    async def ModelReady(self, request, context):
        self._check_model(request.name)
        return ipb.ModelReadyResponse(ready=self.core.ready())

    async def ServerMetadata(self, request, context):
        return ipb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    @map_errors
    async def ModelMetadata(self, request, context):
        self._check_model(request.name)
        return oip.model_metadata(self.spec.name, versions=["1"])

    @map_errors
    async def ModelInfer(self, request: ipb.ModelInferRequest, context) -> ipb.ModelInferResponse:
        self._check_model(request.model_name)
        request_id = request.id or uuid.uuid4().hex[:16]
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            return await self._infer(request, request_id, context)
        except ServingError as exc:
            key = {"DEADLINE_EXCEEDED": "dropped", "RESOURCE_EXHAUSTED": "shed",
                   "INVALID_ARGUMENT": "invalid"}.get(exc.code, "failed")
            self.counts[key] += 1
            log.info("request_failed", code=exc.code, reason=str(exc))
            raise
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    async def _infer(self, request, request_id: str, context) -> ipb.ModelInferResponse:
        now = time.time()
        image = oip.extract_image(request, max_bytes=self.spec.input.max_bytes,
                                  max_side=self.spec.input.max_side)
        self.counts["received"] += 1
        budget_s = self.spec.slo_ms / 1e3
        timeout_ms = oip.request_timeout_ms(request)
        if timeout_ms is not None:
            budget_s = min(budget_s, timeout_ms / 1e3)
        grpc_left = context.time_remaining()
        if grpc_left is not None:
            budget_s = min(budget_s, grpc_left)
        deadline = now + budget_s
        if not self.core.ready():
            raise Unavailable("no plan with workers for every stage yet")
        if not self.admission.admit(now):
            raise Shed(f"over the admission rate of {self.admission.rate:.1f} requests/s")
        self.counts["accepted"] += 1
        [result] = await self.core.route(request_id, deadline, [pb.Query(query_id=request_id, payload=image)], "")
        failure = _failure_of(result)
        if failure is not None:
            status, message = failure
            err = _FAILURE_ERRORS.get(status)
            if err is InvalidInput and result.status == pb.OK:
                err = None   # a crop we made was rejected: our fault, not the client's
            if err is None:
                log.error("request_internal_error", message=message)
                raise ServingError("internal error while serving the request")
            raise err(message)
        self.counts["ok"] += 1
        latency_ms = (time.time() - now) * 1e3
        plan_version = self.core.plan.version if self.core.plan else 0
        path = _variant_path(result)
        log.debug("request_done", latency_ms=round(latency_ms, 1), regions=len(result.regions),
                  plan_version=plan_version, variant_path=path)
        params = {"plan_version": plan_version, "variant_path": path}
        if self.spec.output == "ocr_lines":
            lines = format_ocr_lines(result)
        else:
            lines = [oip.OcrLine(r.label or r.text, tuple(r.points) if len(r.points) == 8 else (0.0,) * 8,
                                 r.score) for r in result.regions]
        return oip.build_ocr_response(self.spec.name, request_id, lines, params)
