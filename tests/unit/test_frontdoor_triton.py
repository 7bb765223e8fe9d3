"""The front door's Triton extensions in process (ModelConfig, ModelStatistics,
RepositoryIndex, ModelStreamInfer, requested outputs), with the fake router core and gRPC
context of test_frontdoor_servicer.py; their statistics arithmetic (services/router/stats.py);
and their wire compatibility with Triton's own generated messages (tritonclient's, decoded
in a child process: the two copies of package ``inference`` cannot share one process)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from services.common import oip
from services.common.errors import InvalidInput
from services.gen import inference_pb2 as ipb
from services.gen import model_config_pb2 as mc
from services.gen import pipeserve_pb2 as pb
from services.policy.admission import TokenBucket
from services.router.frontdoor_plane import FrontDoorPlane
from services.router.servicer import FrontDoorServicer
from services.router.stats import FrontDoorStats, critical_path_ms
from test_frontdoor_servicer import PNG, FakeContext, FakeCore, ok_result  # tests/unit is on sys.path


@pytest.fixture()
def servicer():
    made = []

    def make(core=None, rate=None) -> FrontDoorServicer:
        s = FrontDoorServicer(FrontDoorPlane(core or FakeCore(), TokenBucket(rate)))
        made.append(s)
        return s

    yield make
    for s in made:
        s.plane.close()


def unary(method, request, ctx=None):
    ctx = ctx or FakeContext()

    async def go():
        try:
            return await method(request, ctx)
        except grpc.aio.AbortError:
            return None

    return asyncio.run(go()), ctx


def timed_result(query_id: str) -> pb.QueryResult:
    """ok_result with worker times: root queue 4 + batch 10 ms; its children 1+5 and 3+6."""
    r = ok_result(query_id)
    r.queue_ms, r.service_ms = 4.0, 10.0
    r.children[0].queue_ms, r.children[0].service_ms = 1.0, 5.0
    r.children[1].queue_ms, r.children[1].service_ms = 3.0, 6.0
    return r


# --------------------------------------------------------------------------- statistics


def test_critical_path_follows_the_child_that_finished_last():
    r = timed_result("q")
    assert critical_path_ms(r) == (4.0 + 3.0, 10.0 + 6.0)
    grandchild = r.children[0].children.add(queue_ms=20.0, service_ms=1.0)
    assert grandchild is not None
    assert critical_path_ms(r) == (4.0 + 1.0 + 20.0, 10.0 + 5.0 + 1.0)   # 27 ms beat 9 ms
    assert critical_path_ms(pb.QueryResult()) == (0.0, 0.0)


def test_stats_parts_never_exceed_the_total():
    s = FrontDoorStats(clock=lambda: 1234.5)
    s.record_success(10_000_000, queue_ms=2.0, service_ms=5.0, input_ns=1_000_000, output_ns=500_000)
    s.record_success(4_000_000, queue_ms=3.0, service_ms=5.0, input_ns=500_000, output_ns=500_000)
    s.record_failure(7_000)
    p = s.proto("ocr")
    st = p.inference_stats
    assert (p.name, p.version, p.last_inference) == ("ocr", "1", 1234500)
    assert p.inference_count == p.execution_count == st.success.count == 2
    assert st.success.ns == 14_000_000 and (st.fail.count, st.fail.ns) == (1, 7_000)
    # the second request: 0.5 input + 3 queue leaves 0.5 ms of its 4 for the batch, none for output
    assert (st.compute_input.ns, st.queue.ns, st.compute_infer.ns, st.compute_output.ns) == (
        1_500_000, 5_000_000, 5_500_000, 500_000)
    assert {st.queue.count, st.compute_input.count, st.compute_infer.count, st.compute_output.count} == {2}


# --------------------------------------------------------------------------- codec


def test_requested_outputs():
    req = oip.build_image_request("ocr", PNG)
    assert oip.requested_outputs(req) is None
    req.outputs.add(name="confidence")
    req.outputs.add(name="text").parameters["binary_data"].bool_param = True
    assert oip.requested_outputs(req) == ("confidence", "text")
    resp = oip.build_ocr_response("ocr", "r", [oip.OcrLine("hi", (0,) * 8, 0.5)], outputs=("confidence", "text"))
    assert [o.name for o in resp.outputs] == ["confidence", "text"]
    assert oip.decode_bytes_tensor(resp.raw_output_contents[1]) == [b"hi"]


@pytest.mark.parametrize("names, param, match", [
    (["scores"], None, "unknown output 'scores'"),
    (["text", "text"], None, "requested twice"),
    (["boxes"], "classification", "classification not supported"),
    (["boxes"], "shared_memory_region", "shared_memory_region not supported"),
])
def test_requested_outputs_refused(names, param, match):
    req = oip.build_image_request("ocr", PNG)
    for name in names:
        out = req.outputs.add(name=name)
    if param:
        out.parameters[param].int64_param = 3
    with pytest.raises(InvalidInput, match=match):
        oip.requested_outputs(req)


def test_model_config_matches_the_metadata():
    cfg = oip.model_config("ocr", parameters={"slo_ms": "1500"})
    meta = oip.model_metadata("ocr")
    assert cfg.max_batch_size == 0 and list(cfg.version_policy.specific.versions) == [1]
    assert [(t.name, list(t.dims)) for t in cfg.input] == [(t.name, list(t.shape)) for t in meta.inputs]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [(t.name, list(t.shape)) for t in meta.outputs]
    assert [t.data_type for t in cfg.input] == [mc.TYPE_STRING]
    assert [t.data_type for t in cfg.output] == [mc.TYPE_STRING, mc.TYPE_FP32, mc.TYPE_FP32]
    assert cfg.parameters["slo_ms"].string_value == "1500"
    with pytest.raises(ValueError):
        oip.model_config("ocr", version="latest")


# --------------------------------------------------------------------------- the RPCs


def test_model_config_of_the_pipeline(servicer):
    s = servicer()
    resp, ctx = unary(s.ModelConfig, ipb.ModelConfigRequest(name="ocr"))
    cfg = resp.config
    assert ctx.code is None and cfg.name == "ocr" and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input] == ["image"]
    assert [o.name for o in cfg.output] == ["text", "boxes", "confidence"]
    assert cfg.parameters["stages"].string_value.startswith("det[det_v6tiny_320, ")
    assert cfg.parameters["slo_ms"].string_value == "1500"
    assert unary(s.ModelConfig, ipb.ModelConfigRequest(name="ocr", version="1"))[1].code is None
    for bad in (ipb.ModelConfigRequest(name="nope"), ipb.ModelConfigRequest(name="ocr", version="2")):
        resp, ctx = unary(s.ModelConfig, bad)
        assert resp is None and ctx.code == grpc.StatusCode.NOT_FOUND


class SlowCore(FakeCore):
    """Takes 30 ms a request (more than timed_result's 7 + 16 ms of worker times, which are
    capped at the request's total otherwise)."""

    def __init__(self) -> None:
        super().__init__(behaviour=timed_result)

    async def route(self, *args):
        await asyncio.sleep(0.03)
        return await super().route(*args)


def test_statistics_count_what_the_front_door_served(servicer):
    s = servicer(SlowCore())
    for rid in ("a", "b"):
        assert unary(s.ModelInfer, oip.build_image_request("ocr", PNG, request_id=rid))[1].code is None
    bad = oip.build_image_request("ocr", b"not an image")
    assert unary(s.ModelInfer, bad)[1].code == grpc.StatusCode.INVALID_ARGUMENT
    other = oip.build_image_request("other", PNG)
    assert unary(s.ModelInfer, other)[1].code == grpc.StatusCode.NOT_FOUND   # not this model's
    for request in (ipb.ModelStatisticsRequest(), ipb.ModelStatisticsRequest(name="ocr", version="1")):
        [st], ctx = unary(s.ModelStatistics, request)[0].model_stats, None
        assert (st.name, st.version, st.inference_count, st.execution_count) == ("ocr", "1", 2, 2)
        i = st.inference_stats
        assert (i.success.count, i.fail.count) == (2, 1)
        assert i.queue.ns == 2 * 7_000_000 and i.compute_infer.ns == 2 * 16_000_000   # the critical path
        parts = i.queue.ns + i.compute_input.ns + i.compute_infer.ns + i.compute_output.ns
        assert i.compute_input.ns > 0 and i.compute_output.ns > 0 and parts <= i.success.ns
        assert st.last_inference > 0
    assert unary(s.ModelStatistics, ipb.ModelStatisticsRequest(version="9"))[0].model_stats == []
    resp, ctx = unary(s.ModelStatistics, ipb.ModelStatisticsRequest(name="nope"))
    assert resp is None and ctx.code == grpc.StatusCode.NOT_FOUND


def test_repository_index(servicer):
    ready, unready = servicer(), servicer(FakeCore(ready=False))
    [m] = unary(ready.RepositoryIndex, ipb.RepositoryIndexRequest())[0].models
    assert (m.name, m.version, m.state, m.reason) == ("ocr", "1", "READY", "")
    [m] = unary(unready.RepositoryIndex, ipb.RepositoryIndexRequest())[0].models
    assert m.state == "UNAVAILABLE" and "no plan" in m.reason
    assert unary(unready.RepositoryIndex, ipb.RepositoryIndexRequest(ready=True))[0].models == []
    resp, ctx = unary(ready.RepositoryIndex, ipb.RepositoryIndexRequest(repository_name="x"))
    assert resp is None and ctx.code == grpc.StatusCode.NOT_FOUND


def test_server_metadata_names_the_extensions(servicer):
    resp, _ = unary(servicer().ServerMetadata, ipb.ServerMetadataRequest())
    assert set(resp.extensions) == {"model_configuration", "statistics"}


def test_requested_outputs_come_back_alone_and_a_wrong_name_costs_no_run(servicer):
    s = servicer()
    req = oip.build_image_request("ocr", PNG, request_id="o")
    req.outputs.add(name="boxes")
    resp, ctx = unary(s.ModelInfer, req)
    assert ctx.code is None and [o.name for o in resp.outputs] == ["boxes"]
    assert list(resp.outputs[0].shape) == [2, 8] and len(resp.raw_output_contents) == 1
    assert resp.model_version == "1"
    req.outputs.add(name="nope")
    resp, ctx = unary(s.ModelInfer, req)
    assert resp is None and ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in ctx.details
    assert len(s.plane.core.calls) == 1


def _stream(s: FrontDoorServicer, messages: list, ctx: FakeContext | None = None, *,
            on_answer=None, timeout_s: float = 30.0) -> list[ipb.ModelStreamInferResponse]:
    """Drive ModelStreamInfer with ``messages`` (bytes, as the wire gives them) and collect
    its answers; ``on_answer(answer)`` runs as each arrives. Fails rather than hangs."""
    ctx = ctx or FakeContext()

    async def requests():
        from services.router.frontdoor_plane import RawInferRequest
        for m in messages:
            yield RawInferRequest(m)

    async def go():
        got = []
        async for answer in s.ModelStreamInfer(requests(), ctx):
            got.append(answer)
            if on_answer is not None:
                on_answer(answer)
        return got

    async def bounded():
        return await asyncio.wait_for(go(), timeout_s)

    return asyncio.run(bounded())


def test_stream_answers_every_request_once_errors_included(servicer):
    s = servicer()
    bad_type = oip.build_image_request("ocr", PNG, request_id="bad")
    bad_type.inputs[0].datatype = "FP32"
    messages = [oip.build_image_request("ocr", PNG, request_id="ok1").SerializeToString(),
                bad_type.SerializeToString(),
                b"\xff\xff not a protobuf",
                oip.build_image_request("nope", PNG, request_id="nf").SerializeToString(),
                oip.build_image_request("ocr", PNG, request_id="ok2").SerializeToString()]
    answers = _stream(s, messages)
    assert len(answers) == len(messages)
    by_id = {}
    for a in answers:
        by_id.setdefault(a.infer_response.id, []).append(a)
    assert sorted(by_id) == ["", "bad", "nf", "ok1", "ok2"]
    for rid in ("ok1", "ok2"):
        [a] = by_id[rid]
        assert a.error_message == "" and [ln.text for ln in oip.parse_ocr_response(a.infer_response)] == [
            "line 0", "line 1"]
    [a] = by_id["bad"]
    assert a.error_message.startswith("INVALID_ARGUMENT: ") and "datatype" in a.error_message
    assert a.infer_response.model_name == "ocr"
    [a] = by_id["nf"]
    assert a.error_message.startswith("NOT_FOUND: ")
    [a] = by_id[""]
    assert a.error_message.startswith("INVALID_ARGUMENT: ") and "not a valid ModelInferRequest" in a.error_message
    assert s.plane.counts["ok"] == 2 and s.plane.counts["invalid"] == 2 and s.plane.counts["not_found"] == 1


def test_stream_serves_requests_concurrently(servicer):
    """A slow request does not hold back the one behind it: the first request's route waits
    until the second one's answer has been sent on the stream (a stream that served in
    order would never get there: the wait_for of _stream fails it)."""

    class GatedCore(FakeCore):
        release: asyncio.Event | None = None

        def hold(self) -> asyncio.Event:
            if self.release is None:   # made inside the running loop
                self.release = asyncio.Event()
            return self.release

        async def route(self, request_id, deadline_s, queries, upstream_path):
            if request_id == "slow":
                await self.hold().wait()
            return await super().route(request_id, deadline_s, queries, upstream_path)

    s = servicer(GatedCore())
    order = []

    def on_answer(a):
        order.append(a.infer_response.id)
        if a.infer_response.id == "fast":
            s.plane.core.hold().set()

    messages = [oip.build_image_request("ocr", PNG, request_id=r).SerializeToString()
                for r in ("slow", "fast")]
    answers = _stream(s, messages, on_answer=on_answer, timeout_s=20)
    assert order == ["fast", "slow"] and all(a.error_message == "" for a in answers)


def test_stream_ends_when_the_client_sends_nothing(servicer):
    assert _stream(servicer(), []) == []


# --------------------------------------------------------------------------- wire compatibility


_DECODE_WITH_TRITON = """
import json, sys
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2
out = []
for name, hexdata in json.load(sys.stdin):
    msg = getattr(service_pb2, name).FromString(bytes.fromhex(hexdata))
    out.append(MessageToDict(msg, preserving_proto_field_name=True))
print(json.dumps(out))
"""


def test_triton_decodes_our_messages_field_for_field(servicer):
    """Each new message, serialized by us and decoded by tritonclient's copy of Triton's
    grpc_service.proto / model_config.proto: the same fields with the same values (a field
    number off by one would land in another field or in the unknown fields)."""
    assert importlib.util.find_spec("tritonclient") is not None, \
        "tritonclient is not installed (pip install -e '.[dev]')"
    s = servicer(FakeCore(behaviour=timed_result))
    unary(s.ModelInfer, oip.build_image_request("ocr", PNG, request_id="w"))
    unary(s.ModelInfer, oip.build_image_request("ocr", b"junk"))
    messages = [
        unary(s.ModelConfig, ipb.ModelConfigRequest(name="ocr"))[0],
        unary(s.ModelStatistics, ipb.ModelStatisticsRequest(name="ocr"))[0],
        unary(s.RepositoryIndex, ipb.RepositoryIndexRequest())[0],
        _stream(s, [oip.build_image_request("ocr", b"junk", request_id="e").SerializeToString()])[0],
        ipb.ModelConfigRequest(name="ocr", version="1"),
        ipb.ModelStatisticsRequest(name="ocr", version="1"),
        ipb.RepositoryIndexRequest(repository_name="r", ready=True),
        ipb.ModelStreamInferResponse(infer_response=oip.build_ocr_response(
            "ocr", "x", [oip.OcrLine("a", (1,) * 8, 0.5)], {"plan_version": 3})),
    ]
    payload = json.dumps([(type(m).__name__, m.SerializeToString().hex()) for m in messages])
    done = subprocess.run([sys.executable, "-c", _DECODE_WITH_TRITON], input=payload, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)
    ours = [MessageToDict(m, preserving_proto_field_name=True) for m in messages]
    for mine, triton, m in zip(ours, theirs, messages):
        assert triton == mine, type(m).__name__
    # and the values are what we meant, not empty on both sides
    cfg = theirs[0]["config"]
    assert cfg["input"][0]["data_type"] == "TYPE_STRING" and cfg["version_policy"]["specific"]["versions"] == ["1"]
    assert theirs[1]["model_stats"][0]["inference_stats"]["success"]["count"] == "1"
    assert theirs[3]["error_message"].startswith("INVALID_ARGUMENT: ")


def test_perf_analyzer_input_data_is_the_serialized_bytes_tensor(tmp_path):
    """perf_analyzer takes a BYTES input's b64 as the serialized tensor (length prefix + bytes)."""
    import base64

    from services.tools.perf_analyzer import IMAGE_INPUT, read_csv_report, write_input_data

    assert IMAGE_INPUT == oip.IMAGE_INPUT
    data = json.loads(write_input_data(tmp_path / "in.json", [PNG, b"x"]).read_text())
    steps = [base64.b64decode(step["image"]["b64"]) for step in data["data"]]
    assert [oip.decode_bytes_tensor(s) for s in steps] == [[PNG], [b"x"]]
    (tmp_path / "r.csv").write_text("Concurrency,Inferences/Second,p50 latency\n1,7.5,132474\n4,13.4,293820\n")
    assert read_csv_report(tmp_path / "r.csv") == [
        {"Concurrency": 1.0, "Inferences/Second": 7.5, "p50 latency": 132474.0},
        {"Concurrency": 4.0, "Inferences/Second": 13.4, "p50 latency": 293820.0}]
