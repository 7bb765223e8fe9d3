"""Triton's extensions of the front door for perf_analyzer and Triton clients, over its data
plane and without gRPC: the server's and the model's metadata, ModelConfig (the pipeline as
one model of version "1", ``oip.model_config``), ModelStatistics, RepositoryIndex, and the
answers of ModelStreamInfer (each request on a stream gets exactly one answer, in the order
they finish)."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from services.common import oip
from services.common.errors import NotFound, ServingError
from services.gen import inference_pb2 as ipb
from services.router.frontdoor_plane import FrontDoorPlane
from services.router.stats import MODEL_VERSION

SERVER_NAME = "pipeserve"
SERVER_VERSION = "0.1.0"

R = TypeVar("R")
A = TypeVar("A")


class TritonExtensions:
    """The answers of Triton's extensions for the one model ``plane`` serves; a request
    that names another model (or version) raises NotFound, as ModelInfer does."""

    def __init__(self, plane: FrontDoorPlane) -> None:
        self.plane = plane
        self.spec = plane.spec

    @staticmethod
    def server_metadata() -> ipb.ServerMetadataResponse:
        return ipb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                          extensions=["model_configuration", "statistics"])

    def model_metadata(self, name: str, version: str) -> ipb.ModelMetadataResponse:
        self.plane.check_model(name, version)
        return oip.model_metadata(self.spec.name, versions=[MODEL_VERSION], orientation=self.plane.orientation)

    def model_config(self, name: str, version: str) -> ipb.ModelConfigResponse:
        """The pipeline as Triton's model configuration; its parameters say what the
        model is (the pipeline's stages, SLO and output format)."""
        self.plane.check_model(name, version)
        stages = " -> ".join(f"{t.name}[{', '.join(v.name for v in t.variants)}]"
                             for t in self.spec.tasks)
        return ipb.ModelConfigResponse(config=oip.model_config(
            self.spec.name, version=MODEL_VERSION,
            parameters={"pipeline": self.spec.name, "stages": stages,
                        "slo_ms": f"{self.spec.slo_ms:g}", "output": self.spec.output},
            orientation=self.plane.orientation))

    def model_statistics(self, name: str, version: str) -> ipb.ModelStatisticsResponse:
        """The model's cumulative statistics (FrontDoorStats); an empty name or version
        means all (the one model, the one version)."""
        if name:
            self.plane.check_model(name, version)
        elif version not in ("", MODEL_VERSION):
            return ipb.ModelStatisticsResponse()
        return ipb.ModelStatisticsResponse(model_stats=[self.plane.stats.proto(self.spec.name)])

    def repository_index(self, repository: str, ready_only: bool) -> ipb.RepositoryIndexResponse:
        """The one model: READY when the plan has workers for every stage, else
        UNAVAILABLE with the reason (left out with ``ready_only``)."""
        if repository:
            raise NotFound(f"unknown model repository {repository!r}; this server "
                           "has one unnamed repository")
        ready = self.plane.ready()
        if ready_only and not ready:
            return ipb.RepositoryIndexResponse()
        entry = ipb.RepositoryIndexResponse.ModelIndex(
            name=self.spec.name, version=MODEL_VERSION, state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else "no plan with workers for every stage yet")
        return ipb.RepositoryIndexResponse(models=[entry])

    async def stream_answer(self, request, client: str,
                            time_remaining: float | None) -> ipb.ModelStreamInferResponse:
        """One request of a stream to its answer on the stream, as ModelInfer serves it
        (``FrontDoorPlane.infer``). A failed request's answer has ``error_message`` "CODE:
        message" (the gRPC status code name it would have had on ModelInfer) and the
        request's id and model in ``infer_response``, where known."""
        async def read():
            return request
        note: dict = {}
        try:
            return ipb.ModelStreamInferResponse(
                infer_response=await self.plane.infer(read, client, time_remaining, note))
        except ServingError as exc:
            return ipb.ModelStreamInferResponse(
                error_message=f"{exc.code}: {exc}",
                infer_response=ipb.ModelInferResponse(model_name=note.get("model", ""),
                                                      model_version=note.get("version", ""),
                                                      id=note.get("id", "")))


async def answer_stream(requests: AsyncIterator[R], answer: Callable[[R], Awaitable[A]]) -> AsyncIterator[A]:
    """Triton's streaming inference: the requests are answered concurrently as they arrive
    (``answer``, one task each), and each answer is yielded as it finishes. It ends once
    ``requests`` is exhausted and every answer is yielded; closing it early cancels the
    reading and the answers still in progress."""
    answers: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def one(request) -> None:
        answers.put_nowait(await answer(request))

    async def pump() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(pump())
    try:
        while (response := await answers.get()) is not None:
            yield response
        await reader   # re-raises what ended the reading, if anything did
    finally:
        for task in (reader, *tasks):
            task.cancel()
