"""Outbound gRPC stubs of the router: to its stage's workers and to child routers.
Failures become :class:`CallFailed` with the QueryStatus their queries get."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from services.common.errors import ServingError
from services.common.grpc_utils import TlsConfig, make_channel
from services.common.logging import get_logger
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.core import CallFailed

log = get_logger(__name__)

_CODE_TO_STATUS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: pb.DROPPED_DEADLINE,
    grpc.StatusCode.UNAVAILABLE: pb.UNAVAILABLE,
    # A whole call refused as INVALID_ARGUMENT means this router built a bad message: its
    # fault, not the client's (a client's bad payload comes back as an INVALID query result).
    grpc.StatusCode.INVALID_ARGUMENT: pb.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED: pb.SHED,
    grpc.StatusCode.CANCELLED: pb.UNAVAILABLE,
}

# the same for a child router served in this process: its ServingError's gRPC code name
_STATUS_OF_ERROR = {code.name: status for code, status in _CODE_TO_STATUS.items()}


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


@dataclass
class LocalRouteResponse:
    """What :class:`InlineChildClient` answers: a ``RouteResponse``'s two fields, the
    results not copied into a message."""
    results: list
    plan_version: int


class InlineChildClient:
    """Child stages served in this process (``pipeserve-router --inline-children``): a
    call to one of ``local``'s tasks runs its :class:`RouterCore` directly, without a
    gRPC hop; any other child task goes to ``remote``. Failures become the same
    :class:`CallFailed` statuses a gRPC call to a child router would give."""

    def __init__(self, local: dict, remote: ChildRouterClient) -> None:
        self.local = local   # task -> RouterCore
        self.remote = remote

    async def route(self, task: str, request: pb.RouteRequest, timeout_s: float):
        core = self.local.get(task)
        if core is None:
            return await self.remote.route(task, request, timeout_s)
        if not request.queries:
            raise CallFailed(pb.INTERNAL, f"router {task}: no queries in request")
        try:
            results = await asyncio.wait_for(
                core.route(request.request_id, request.deadline_unix_s, list(request.queries),
                           request.upstream_path), timeout_s)
        except asyncio.TimeoutError:
            raise CallFailed(pb.DROPPED_DEADLINE, f"router {task}: deadline exceeded") from None
        except ServingError as exc:
            raise CallFailed(_STATUS_OF_ERROR.get(exc.code, pb.INTERNAL), f"router {task}: {exc}") from None
        except CallFailed:
            raise
        except Exception:
            log.exception("inline_child_failed", child=task)
            raise CallFailed(pb.INTERNAL, f"router {task}: internal error") from None
        return LocalRouteResponse(results, core.plan.version if core.plan is not None else 0)

    async def close(self, grace_s: float | None = None) -> None:
        await self.remote.close(grace_s)
