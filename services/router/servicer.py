"""gRPC adapters of the router: the internal Route service, and for the first stage the
Open Inference Protocol v2 front door (model name = pipeline name), a thin adapter over its
data plane (services/router/frontdoor_plane.py) and Triton's extensions
(services/router/frontdoor_triton.py)."""
from __future__ import annotations

from contextlib import aclosing

import grpc

from services.common.errors import InvalidInput
from services.common.grpc_utils import map_errors
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.core import RouterCore
from services.router.frontdoor_gate import client_of
from services.router.frontdoor_plane import FrontDoorPlane, RawInferRequest
from services.router.frontdoor_triton import TritonExtensions, answer_stream


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


def receive_limit_bytes(spec) -> int:
    """gRPC's receive limit for the front door's server: twice the spec's ``max_bytes`` plus
    64 KiB of message overhead. Up to it an oversize image gets INVALID_ARGUMENT naming the
    limit; past it gRPC itself refuses the message (RESOURCE_EXHAUSTED)."""
    return 2 * spec.input.max_bytes + 64 * 1024


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
    """OIP v2 over gRPC: each method turns its call into a call of the front door's data
    plane (``plane``, :class:`FrontDoorPlane`: the request pipeline, its checks, counts and
    statistics) or of Triton's extensions over it, and the result into its answer; a
    ServingError becomes its status code with its message (``map_errors``).

    Triton's extensions for perf_analyzer and Triton clients: ModelConfig, ModelStatistics,
    RepositoryIndex and ModelStreamInfer (each request on the stream gets exactly one
    answer, in the order they finish: its response, or ``error_message`` = "CODE: message"
    with the request's id in ``infer_response``). A request that names outputs gets those
    only."""

    def __init__(self, plane: FrontDoorPlane) -> None:
        self.plane = plane
        self.triton = TritonExtensions(plane)

    async def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=self.plane.ready())

    @map_errors
    async def ModelReady(self, request, context):
        self.plane.check_model(request.name)
        return ipb.ModelReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request, context):
        return self.triton.server_metadata()

    @map_errors
    async def ModelMetadata(self, request, context):
        return self.triton.model_metadata(request.name, request.version)

    @map_errors
    async def ModelConfig(self, request, context):
        return self.triton.model_config(request.name, request.version)

    @map_errors
    async def ModelStatistics(self, request, context):
        return self.triton.model_statistics(request.name, request.version)

    @map_errors
    async def RepositoryIndex(self, request, context):
        return self.triton.repository_index(request.repository_name, request.ready)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference: requests are served concurrently as they arrive,
        each with the same checks as ModelInfer, and each gets exactly one answer on the
        stream as it finishes (a client matches them by ``id``). The stream ends once the
        client has closed its side and every answer is sent."""
        client = client_of(context)

        async def answer(request) -> ipb.ModelStreamInferResponse:
            return await self.triton.stream_answer(request, client, context.time_remaining())

        async with aclosing(answer_stream(request_iterator, answer)) as answers:
            async for response in answers:
                yield response

    @map_errors
    async def ModelInfer(self, request, context) -> ipb.ModelInferResponse:
        """Unary form: ``request`` is a parsed ModelInferRequest or a RawInferRequest."""
        async def read():
            return request
        return await self.plane.infer(read, client_of(context), context.time_remaining())

    @map_errors
    async def ModelInferStream(self, request_iterator, context) -> ipb.ModelInferResponse:
        """What :func:`add_front_door_to_server` serves ModelInfer with: the body is read
        (``context.read()``) only once the checks before reading have passed."""
        async def read():
            message = await context.read()
            if message is grpc.aio.EOF:
                raise InvalidInput("the call carried no request message")
            return message
        return await self.plane.infer(read, client_of(context), context.time_remaining())
