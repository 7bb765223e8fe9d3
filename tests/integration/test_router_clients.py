"""The router's outbound channels over real gRPC on loopback: dropping a worker from the
plan does not wait for its in-flight calls (they still finish), and stopping closes every
channel within the grace it is given, cancelling a call that would never end."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.router.clients import WorkerClient
from services.router.core import CallFailed

pytestmark = pytest.mark.integration

HANG_GUARD_S = 60.0   # only so that a hang fails the test instead of stalling the suite


class _HeldWorker(pb_grpc.WorkerServicer):
    """Answers InferBatch only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def InferBatch(self, request, context):
        self.started.set()
        await self.release.wait()
        return pb.InferBatchResponse()


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_dropping_a_worker_does_not_wait_for_its_calls_and_they_still_finish():
    async def scenario():
        worker = _HeldWorker()
        server, address = await _serve(worker)
        client = WorkerClient()
        try:
            call = asyncio.create_task(client.infer(address, pb.InferBatchRequest(), timeout_s=HANG_GUARD_S))
            await asyncio.wait_for(worker.started.wait(), HANG_GUARD_S)
            await asyncio.wait_for(client.retain(set(), grace_s=HANG_GUARD_S), HANG_GUARD_S)
            in_flight_after_retain = not call.done()
            worker.release.set()
            answer = await asyncio.wait_for(call, HANG_GUARD_S)
            await asyncio.wait_for(client.close(grace_s=1.0), HANG_GUARD_S)
            return in_flight_after_retain, answer
        finally:
            await server.stop(None)

    in_flight_after_retain, answer = asyncio.run(scenario())
    assert in_flight_after_retain          # retain returned while the call was in flight
    assert isinstance(answer, pb.InferBatchResponse)   # and the call finished on the closing channel


def test_close_cuts_short_a_call_that_would_never_end():
    async def scenario():
        worker = _HeldWorker()   # never released
        server, address = await _serve(worker)
        client = WorkerClient()
        try:
            call = asyncio.create_task(client.infer(address, pb.InferBatchRequest(), timeout_s=3600))
            await asyncio.wait_for(worker.started.wait(), HANG_GUARD_S)
            await client.retain(set(), grace_s=3600)        # a dropped worker, closing slowly
            await asyncio.wait_for(client.close(grace_s=0.2), HANG_GUARD_S)
            try:
                await asyncio.wait_for(call, HANG_GUARD_S)
            except (CallFailed, asyncio.CancelledError) as exc:
                return exc
            return None
        finally:
            await server.stop(None)

    outcome = asyncio.run(scenario())
    assert outcome is not None, "the call went on after the client closed its channels"
