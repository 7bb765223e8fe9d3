"""gRPC adapter for the worker core: proto -> core call -> proto."""
from __future__ import annotations

from services.common.errors import DeadlineMissed, InvalidInput
from services.common.grpc_utils import map_errors, remaining_s
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.worker.core import Outcome, Status, WorkerCore

_STATUS = {
    Status.OK: pb.OK,
    Status.DROPPED_DEADLINE: pb.DROPPED_DEADLINE,
    Status.INVALID: pb.INVALID,
    Status.INTERNAL: pb.INTERNAL,
}


def outcome_to_proto(o: Outcome, task: str, worker_id: str) -> pb.QueryResult:
    r = pb.QueryResult(query_id=o.query_id, status=_STATUS[o.status], message=o.message, task=task,
                       variant=o.variant, worker_id=worker_id, queue_ms=o.queue_ms,
                       service_ms=o.service_ms, batch_size=o.batch_size)
    if o.result is not None:
        for reg in o.result.regions:
            r.regions.add(points=list(reg.points), score=reg.score, text=reg.text,
                          confidence=reg.confidence, label=reg.label)
        r.child_payloads.extend(o.result.child_payloads)
    return r


def stats_to_proto(s: dict) -> pb.WorkerStats:
    return pb.WorkerStats(**s)


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, core: WorkerCore) -> None:
        self.core = core

    @map_errors
    async def InferBatch(self, request: pb.InferBatchRequest, context) -> pb.InferBatchResponse:
        if request.task and request.task != self.core.task.name:
            raise InvalidInput(f"worker {self.core.worker_id} serves task {self.core.task.name!r}, "
                               f"not {request.task!r}")
        if not request.queries:
            raise InvalidInput("no queries in request")
        if request.deadline_unix_s <= 0:
            raise InvalidInput("deadline_unix_s is required")
        if remaining_s(request.deadline_unix_s) <= 0:
            raise DeadlineMissed("deadline already passed on arrival")
        outcomes = await self.core.submit(
            [(q.query_id, q.payload) for q in request.queries], request.deadline_unix_s,
            request.downstream_reserve_ms / 1e3)
        return pb.InferBatchResponse(
            results=[outcome_to_proto(o, self.core.task.name, self.core.worker_id) for o in outcomes],
            plan_version=self.core.plan_version)

    @map_errors
    async def GetStats(self, request, context) -> pb.WorkerStats:
        return stats_to_proto(self.core.stats())
