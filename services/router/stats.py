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


def _path_cost_ms(result: pb.QueryResult) -> float:
    """How long ``result``'s subtree took, to pick the child that finished last: the
    round trip its router measured (worker call + child stages) when recorded, else the
    worker's queue + batch times down its own slowest path."""
    if result.call_ms > 0:
        return result.call_ms + result.children_ms
    return result.queue_ms + result.service_ms + max((_path_cost_ms(c) for c in result.children), default=0.0)


def critical_path(result: pb.QueryResult) -> list[pb.QueryResult]:
    """The results along the path through ``result``'s tree that finished last: the root
    stage's, then the child (over every child stage and region) that took longest, and so
    on down."""
    path = [result]
    while result.children:
        result = max(result.children, key=_path_cost_ms)
        path.append(result)
    return path


def critical_path_ms(result: pb.QueryResult | list[pb.QueryResult]) -> tuple[float, float]:
    """``(queue_ms, service_ms)`` along :func:`critical_path` (of a result, or the path
    itself): the worker queue and batch times of each stage's query on it."""
    path = critical_path(result) if isinstance(result, pb.QueryResult) else result
    return sum(r.queue_ms for r in path), sum(r.service_ms for r in path)


# -- the per-request latency breakdown ---------------------------------------------------

PHASES = ("input", "queue", "preprocess", "model", "postprocess", "crop_encode", "worker",
          "transfer", "router", "output")
"""The parts of a request's time at the front door (docs/metrics.md, "Latency breakdown"),
summed over the stages on its critical path:

* ``input``: the front door checking (and for raw pixels re-encoding) the image;
* ``queue``: waiting in the workers' queues for a batch;
* ``preprocess``: decoding and pre-processing in the workers (the submission's, wall
  time) and assembling the batch before the model;
* ``model``: the ONNX Runtime runs of the batches;
* ``postprocess``: the batches' post-processing, crop encoding not included;
* ``crop_encode``: encoding crops for the next stage (the detector's);
* ``worker``: the rest of the time inside the workers (executor hand-offs, the event loop);
* ``transfer``: router -> worker -> router: the worker call's round trip as the router
  measured it, less the worker's own time (gRPC, serialisation, the network);
* ``router``: the routers' own work and the router -> child router hops: each stage's
  time as its caller saw it (the front door's route call, a parent router's wait for its
  child stages), less its worker round trip and its own wait for its children;
* ``output``: the front door building the response.

What is left of the front door's total is ``unaccounted`` (its own bookkeeping)."""


def _pos(x: float) -> float:
    return x if x > 0 else 0.0


def stage_phases(r: pb.QueryResult, outer_ms: float) -> dict[str, float]:
    """One stage's part of the breakdown (ms) for its query ``r`` on the critical path;
    ``outer_ms`` is the stage's time as its caller saw it (the front door's route call for
    the root, the parent router's wait for its children otherwise). Differences of clocks
    read at other moments are floored at 0."""
    work = r.queue_ms + r.preprocess_ms + r.model_ms + r.postprocess_ms + r.crop_encode_ms
    return {
        "queue": r.queue_ms, "preprocess": r.preprocess_ms, "model": r.model_ms,
        "postprocess": r.postprocess_ms, "crop_encode": r.crop_encode_ms,
        "worker": _pos(r.worker_ms - work),
        "transfer": _pos(r.call_ms - r.worker_ms),
        "router": _pos(outer_ms - r.call_ms - r.children_ms),
    }


def breakdown(path: list[pb.QueryResult], total_ms: float, route_ms: float, input_ms: float,
              output_ms: float, stages: bool = True) -> dict:
    """The latency breakdown of one answered request (a plain dict, JSON-ready) from its
    :func:`critical_path`: its ``total_ms`` at the front door, ``phases_ms``
    (:data:`PHASES`, summed over the stages), ``unaccounted_ms`` (the total less the
    phases, floored at 0) and with ``stages`` each stage's task, variant, worker, batch
    size and phases, all rounded to microseconds (without, unrounded: the metrics' copy)."""
    phases = dict.fromkeys(PHASES, 0.0)
    phases["input"], phases["output"] = input_ms, output_ms
    per_stage = []
    outer = route_ms
    for r in path:
        part = stage_phases(r, outer)
        for k, v in part.items():
            phases[k] += v
        if stages:
            per_stage.append({"task": r.task, "variant": r.variant, "worker": r.worker_id,
                              "batch_size": r.batch_size, **{f"{k}_ms": round(v, 3) for k, v in part.items()}})
        outer = r.children_ms
    unaccounted = _pos(total_ms - sum(phases.values()))
    if not stages:   # the metrics' copy, per request: no rounding, no per-stage detail
        return {"total_ms": total_ms, "phases_ms": phases, "unaccounted_ms": unaccounted}
    return {"total_ms": round(total_ms, 3), "phases_ms": {k: round(v, 3) for k, v in phases.items()},
            "unaccounted_ms": round(unaccounted, 3), "stages": per_stage}


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
