"""Minimal grpc.aio servers: the references the benchmarks measure pipeserve against.

Each runs as its own process (so its CPU time can be read from /proc) and prints
``READY <port>`` on stdout once it serves. Raw servers use a generic handler with no
serializers: the request and the reply are bytes, no protobuf is parsed.

    python bench/raw_grpc.py sink                  # /raw.Hop/Call: takes the bytes, answers 64 bytes
    python bench/raw_grpc.py sink_stream           # the same, served by a stream-unary handler that
                                                   # reads the one message (as pipeserve's front door does)
    python bench/raw_grpc.py echo                  # /raw.Hop/Call: answers the request's bytes
    python bench/raw_grpc.py digest                # /raw.Hop/Call: answers "<length>:<crc32 hex>"
    python bench/raw_grpc.py forward --to H:P [--method /raw.Hop/Call] [--project-options]
                                                   # passes the request's bytes to H:P, answers its reply
    python bench/raw_grpc.py oip                   # /inference.GRPCInferenceService/ModelInfer: answers
                                                   # a prebuilt one-line OCR response (bytes, nothing parsed)
    python bench/raw_grpc.py fakeworker [--variant V]
                                                   # pipeserve.v1.Worker/InferBatch (protobuf), answers
                                                   # at once: one OK result with one region per query

``--project-options`` gives the forwarder's outbound channel the options pipeserve's
routers use (``services.common.grpc_utils.CHANNEL_OPTIONS``: retries on, 64 MiB
messages) instead of gRPC's defaults (larger messages allowed, nothing else).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

RAW_METHOD = "/raw.Hop/Call"
BIG = 64 * 1024 * 1024
SERVER_OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG),
                  ("grpc.so_reuseport", 0)]
CLIENT_OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]
SINK_REPLY = b"k" * 64


def _raw_handler(fn) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("raw.Hop", {"Call": grpc.unary_unary_rpc_method_handler(fn)})


async def serve(args) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if args.mode == "sink":
        async def call(request: bytes, context) -> bytes:
            return SINK_REPLY
        server.add_generic_rpc_handlers((_raw_handler(call),))
    elif args.mode == "sink_stream":
        async def call_stream(request_iterator, context) -> bytes:
            message = await context.read()
            if message is grpc.aio.EOF:
                raise RuntimeError("no message")
            return SINK_REPLY
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "raw.Hop", {"Call": grpc.stream_unary_rpc_method_handler(call_stream)}),))
    elif args.mode == "echo":
        async def call(request: bytes, context) -> bytes:
            return request
        server.add_generic_rpc_handlers((_raw_handler(call),))
    elif args.mode == "digest":
        import zlib

        async def call(request: bytes, context) -> bytes:
            return f"{len(request)}:{zlib.crc32(request):08x}".encode()
        server.add_generic_rpc_handlers((_raw_handler(call),))
    elif args.mode == "forward":
        if not args.to:
            raise SystemExit("forward needs --to HOST:PORT")
        if args.project_options:
            from services.common.grpc_utils import CHANNEL_OPTIONS
            options = CHANNEL_OPTIONS
        else:
            options = CLIENT_OPTIONS
        channel = grpc.aio.insecure_channel(args.to, options=options)
        downstream = channel.unary_unary(args.method)

        async def call(request: bytes, context) -> bytes:
            return await downstream(request, timeout=30)
        server.add_generic_rpc_handlers((_raw_handler(call),))
    elif args.mode == "oip":
        from services.common import oip
        reply = oip.build_ocr_response("echo", "r", [oip.OcrLine("ok", (0.0,) * 8, 1.0)],
                                       {"plan_version": 1, "variant_path": "raw"}).SerializeToString()

        async def call(request: bytes, context) -> bytes:
            return reply
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(call)}),))
    elif args.mode == "fakeworker":
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from services.gen import pipeserve_pb2 as pb
        from services.gen import pipeserve_pb2_grpc as pb_grpc

        variant = args.variant

        class FakeWorker(pb_grpc.WorkerServicer):
            async def InferBatch(self, request, context):
                return pb.InferBatchResponse(results=[
                    pb.QueryResult(query_id=q.query_id, status=pb.OK, task=request.task, variant=variant,
                                   worker_id="fake-0", regions=[pb.Region(text=str(len(q.payload)),
                                                                          score=1.0)])
                    for q in request.queries], plan_version=request.plan_version)

            async def GetStats(self, request, context):
                return pb.WorkerStats(worker_id="fake-0", variant=variant, state="serving")

        pb_grpc.add_WorkerServicer_to_server(FakeWorker(), server)
        h = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(h, server)
        await h.set("", health_pb2.HealthCheckResponse.SERVING)
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"READY {port}", flush=True)
    await server.wait_for_termination()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["sink", "sink_stream", "echo", "digest", "forward", "oip", "fakeworker"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--to", default="")
    ap.add_argument("--method", default=RAW_METHOD)
    ap.add_argument("--project-options", action="store_true")
    ap.add_argument("--variant", default="echo_a")
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
