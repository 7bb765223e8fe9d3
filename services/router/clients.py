"""Outbound gRPC stubs of the router: to its stage's workers and to child routers.
Failures become :class:`CallFailed` with the QueryStatus their queries get."""
from __future__ import annotations

import asyncio

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
        self._calls: dict[grpc.aio.Channel, set] = {}     # each channel's calls in flight
        self._closing: dict[grpc.aio.Channel, asyncio.Task] = {}   # dropped workers' channels

    def _entry(self, address: str) -> tuple[grpc.aio.Channel, pb_grpc.WorkerStub]:
        entry = self._stubs.get(address)
        if entry is None:
            channel = make_channel(address, tls=self.tls)
            entry = (channel, pb_grpc.WorkerStub(channel))
            self._stubs[address] = entry
            self._calls[channel] = set()
        return entry

    async def infer(self, address: str, request: pb.InferBatchRequest, timeout_s: float
                    ) -> pb.InferBatchResponse:
        channel, stub = self._entry(address)
        call = stub.InferBatch(request, timeout=timeout_s)
        calls = self._calls[channel]
        calls.add(call)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise _failed(exc, f"worker {address}") from None
        finally:
            calls.discard(call)

    async def retain(self, addresses: set[str], grace_s: float = 5.0) -> None:
        """Close the channels to workers not in ``addresses``. Calls in flight on them get
        ``grace_s`` to finish; the closes run in the background, so a new plan is applied
        (and the next one taken) without waiting for them."""
        for addr in [a for a in self._stubs if a not in addresses]:
            channel, _ = self._stubs.pop(addr)
            task = asyncio.get_running_loop().create_task(channel.close(grace=grace_s))
            self._closing[channel] = task
            task.add_done_callback(lambda _t, ch=channel: self._forget(ch))

    def _forget(self, channel: grpc.aio.Channel) -> None:
        self._closing.pop(channel, None)
        self._calls.pop(channel, None)

    async def close(self, grace_s: float = 5.0) -> None:
        """Close every channel, the ones still closing included, within ``grace_s``: the
        calls still in flight after that are cancelled."""
        await self.retain(set(), grace_s)
        closing = dict(self._closing)
        if not closing:
            return
        _, late = await asyncio.wait(closing.values(), timeout=grace_s)
        for channel, task in closing.items():
            if task in late:   # a close with a longer grace (a worker dropped earlier)
                for call in list(self._calls.get(channel, ())):
                    call.cancel()
        await asyncio.gather(*late, return_exceptions=True)


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

    async def close(self, grace_s: float | None = None) -> None:
        """Close the channels to the child routers; calls in flight get ``grace_s`` (None:
        they are cancelled at once)."""
        stubs, self._stubs = list(self._stubs.values()), {}
        await asyncio.gather(*(channel.close(grace=grace_s) for channel, _ in stubs))
