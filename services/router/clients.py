"""Outbound gRPC stubs of the router: to its stage's workers and to child routers.
Failures become :class:`CallFailed` with the QueryStatus their queries get."""
from __future__ import annotations

import grpc

from services.common.grpc_utils import TlsConfig, make_channel
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.core import CallFailed

_CODE_TO_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: pb.DROPPED_DEADLINE,
    grpc.StatusCode.UNAVAILABLE: pb.UNAVAILABLE,
    # A whole call refused as INVALID_ARGUMENT means this router built a bad message: its
    # fault, not the client's (a client's bad payload comes back as an INVALID query result).
    grpc.StatusCode.INVALID_ARGUMENT: pb.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED: pb.SHED,
    grpc.StatusCode.CANCELLED: pb.UNAVAILABLE,
}


def _failed(exc: grpc.aio.AioRpcError, who: str) -> CallFailed:
    status = _CODE_TO_STATUS.get(exc.code(), pb.INTERNAL)
    return CallFailed(status, f"{who}: {exc.code().name}: {exc.details() or ''}".rstrip(": "))


class WorkerClient:
    """Channels to workers, opened on first use and closed when they leave the plan."""

    def __init__(self, tls: TlsConfig | None = None) -> None:
        self.tls = tls   # None: plaintext
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.WorkerStub]] = {}

    def _stub(self, address: str) -> pb_grpc.WorkerStub:
        entry = self._stubs.get(address)
        if entry is None:
            channel = make_channel(address, tls=self.tls)
            entry = (channel, pb_grpc.WorkerStub(channel))
            self._stubs[address] = entry
        return entry[1]

    async def infer(self, address: str, request: pb.InferBatchRequest, timeout_s: float
                    ) -> pb.InferBatchResponse:
        try:
            return await self._stub(address).InferBatch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _failed(exc, f"worker {address}") from None

    async def retain(self, addresses: set[str]) -> None:
        for addr in [a for a in self._stubs if a not in addresses]:
            channel, _ = self._stubs.pop(addr)
            await channel.close(grace=5)

    async def close(self) -> None:
        await self.retain(set())


class ChildRouterClient:
    def __init__(self, children: dict[str, str], tls: TlsConfig | None = None) -> None:
        self.addresses = dict(children)
        self.tls = tls   # None: plaintext
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.RouterStub]] = {}

    async def route(self, task: str, request: pb.RouteRequest, timeout_s: float) -> pb.RouteResponse:
        if task not in self.addresses:
            raise CallFailed(pb.INTERNAL, f"no router address configured for child task {task!r}")
        entry = self._stubs.get(task)
        if entry is None:
            channel = make_channel(self.addresses[task], tls=self.tls)
            entry = (channel, pb_grpc.RouterStub(channel))
            self._stubs[task] = entry
        try:
            return await entry[1].Route(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _failed(exc, f"router {task}") from None

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
