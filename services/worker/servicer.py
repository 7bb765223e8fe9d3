"""gRPC adapter for the worker core: proto -> core call -> proto."""
from __future__ import annotations

from typing import Callable

from services.common.errors import DeadlineMissed, InvalidInput
from services.common.grpc_utils import map_errors, remaining_s
from services.gen import pipeserve_pb2 as pb
from services.gen import pipeserve_pb2_grpc as pb_grpc
from services.worker.core import BatchTiming, Outcome, Status, WorkerCore

_STATUS = {
    Status.OK: pb.OK,
    Status.DROPPED_DEADLINE: pb.DROPPED_DEADLINE,
    Status.INVALID: pb.INVALID,
    Status.INTERNAL: pb.INTERNAL,
}


def outcome_to_proto(o: Outcome, task: str, worker_id: str) -> pb.QueryResult:
    r = pb.QueryResult(query_id=o.query_id, status=_STATUS[o.status], message=o.message, task=task,
                       variant=o.variant, worker_id=worker_id, queue_ms=o.queue_ms,
                       service_ms=o.service_ms, batch_size=o.batch_size, worker_ms=o.worker_ms)
    if o.phases is not None:
        ph = o.phases
        r.preprocess_ms = o.preprocess_ms + ph.assemble_ms
        r.model_ms, r.postprocess_ms, r.crop_encode_ms = ph.model_ms, ph.postprocess_ms, ph.encode_ms
    else:
        r.preprocess_ms = o.preprocess_ms
    if o.result is not None:
        for reg in o.result.regions:
            r.regions.add(points=list(reg.points), score=reg.score, text=reg.text,
                          confidence=reg.confidence, label=reg.label)
        r.child_payloads.extend(o.result.child_payloads)
    return r


def stats_to_proto(s: dict, timings: list[BatchTiming] = ()) -> pb.WorkerStats:
    msg = pb.WorkerStats(**s)
    msg.timings.extend(pb.BatchTiming(task=t.task, variant=t.variant, batch_size=t.batch_size, count=t.count,
                                      total_ms=t.total_ms, max_ms=t.max_ms, items=t.items, regions=t.regions)
                       for t in timings)
    return msg


class WorkerServicer(pb_grpc.WorkerServicer):
    """``on_newer_plan(version)`` is called when a router sends a request routed with a
    newer plan than the worker runs (the worker then re-reads the plan at once)."""

    def __init__(self, core: WorkerCore, on_newer_plan: Callable[[int], None] | None = None) -> None:
        self.core = core
        self.on_newer_plan = on_newer_plan

    @map_errors
    async def InferBatch(self, request: pb.InferBatchRequest, context) -> pb.InferBatchResponse:
        if request.task and not self.core.may_serve(request.task):
            raise InvalidInput(f"worker {self.core.worker_id} serves tasks {sorted(self.core.tasks)}, "
                               f"not {request.task!r}")
        if not request.queries:
            raise InvalidInput("no queries in request")
        if request.deadline_unix_s <= 0:
            raise InvalidInput("deadline_unix_s is required")
        if request.plan_version > self.core.plan_version and self.on_newer_plan is not None:
            self.on_newer_plan(request.plan_version)
        if remaining_s(request.deadline_unix_s) <= 0:
            raise DeadlineMissed("deadline already passed on arrival")
        outcomes = await self.core.submit(
            [(q.query_id, q.payload) for q in request.queries], request.deadline_unix_s,
            request.downstream_reserve_ms / 1e3, task=request.task or None)
        task = request.task or self.core.task_name
        return pb.InferBatchResponse(
            results=[outcome_to_proto(o, task, self.core.worker_id) for o in outcomes],
            plan_version=self.core.plan_version)

    @map_errors
    async def GetStats(self, request, context) -> pb.WorkerStats:
        return stats_to_proto(self.core.stats())
