"""What the front door measured about the requests it served, in the shape of Triton's
``ModelStatistics`` (the ``statistics`` extension perf_analyzer reads before and after each
measurement window).

The front door serves one model (the pipeline, version ``"1"``) and runs the pipeline once
per request, so Triton's fields mean here:

* ``inference_stats.success``: count of requests answered OK, and the cumulative time from
  the call's arrival at the front door to its answer being ready (ns).
* ``inference_stats.fail``: the same for requests that ended in an error (dropped, shed,
  invalid, failed inside, cancelled by the client); requests naming another model are
  not this model's and are not counted.
* ``inference_stats.queue`` and ``inference_stats.compute_infer`` (successful requests
  only, counted with them): along the request's critical path through the stages (the
  root stage's query, then the child query that finished last, and so on down), the time
  the queries waited in the workers' queues, and the time of the worker batches they ran
  in (pre-processing, model, post-processing of the whole batch), as the workers reported
  them.
* ``inference_stats.compute_input`` and ``compute_output`` (successful requests only):
  the front door's own work on the tensors: checking the input image (re-encoding raw
  pixels), and building the output tensors from the pipeline's result.
* The four times lie within ``success`` (they are capped so, as the workers' clocks are
  read at other moments than ours): what is left of it is the routers' and the network's
  share (perf_analyzer prints it as "overhead").
* ``inference_count`` and ``execution_count``: successful requests (one image each, one
  pipeline run each; the workers' own batching is inside and not visible here).
* ``last_inference``: when the last request for the model finished, ms since the epoch.
* ``batch_stats``: empty (the front door runs no batches).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from services.gen import inference_pb2 as ipb
from services.gen import pipeserve_pb2 as pb

MODEL_VERSION = "1"
"""The one version under which the front door serves its pipeline (OIP/Triton clients
name versions as strings of integers)."""


def critical_path_ms(result: pb.QueryResult) -> tuple[float, float]:
    """``(queue_ms, service_ms)`` along the path through ``result``'s tree that finished
    last: this stage's queue and batch times, plus those of the child path (over every
    child stage and region) with the largest queue + batch time."""
    queue, service = result.queue_ms, result.service_ms
    best: tuple[float, float] | None = None
    for child in result.children:
        path = critical_path_ms(child)
        if best is None or sum(path) > sum(best):
            best = path
    if best is not None:
        queue += best[0]
        service += best[1]
    return queue, service


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))

    def proto(self) -> ipb.StatisticDuration:
        return ipb.StatisticDuration(count=self.count, ns=self.ns)


class FrontDoorStats:
    """Cumulative counts and times of one model (see the module docstring); the event
    loop's thread only."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()
        self.last_inference_ms = 0

    def record_success(self, total_ns: int, queue_ms: float = 0.0, service_ms: float = 0.0,
                       input_ns: int = 0, output_ns: int = 0) -> None:
        """A request answered OK after ``total_ns``: its critical path's worker queue and
        batch times (ms, as the workers report them) and the front door's input and output
        work (ns). Each part is capped at what the total leaves after the parts before it,
        so that queue + compute never exceed the total."""
        left = max(0, int(total_ns))
        parts = []
        for ns in (input_ns, queue_ms * 1e6, service_ms * 1e6, output_ns):
            part = min(max(0, int(ns)), left)
            left -= part
            parts.append(part)
        self.success.add(total_ns)
        for duration, part in zip((self.compute_input, self.queue, self.compute_infer,
                                   self.compute_output), parts):
            duration.add(part)
        self.last_inference_ms = int(self.clock() * 1000)

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.last_inference_ms = int(self.clock() * 1000)

    def proto(self, name: str, version: str = MODEL_VERSION) -> ipb.ModelStatistics:
        return ipb.ModelStatistics(
            name=name, version=version, last_inference=self.last_inference_ms,
            inference_count=self.success.count, execution_count=self.success.count,
            inference_stats=ipb.InferStatistics(
                success=self.success.proto(), fail=self.fail.proto(), queue=self.queue.proto(),
                compute_input=self.compute_input.proto(), compute_infer=self.compute_infer.proto(),
                compute_output=self.compute_output.proto()))
