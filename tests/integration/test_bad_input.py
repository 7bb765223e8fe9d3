"""Bad input at the front door of a real cluster (embedded Redis, controller, one detection
and one recognition worker, two routers, real OCR models): every bad request gets one clear
status, none hangs, no message carries an internal address, the server keeps answering,
and the front door's peak RSS stays bounded.

    .venv/bin/python -m pytest -q tests/integration/test_bad_input.py -s

prints the measured figures (peak RSS of the front door before and after, the time of the
50 concurrent ~7 MB requests and how they were answered); docs/reliability.md records them.
"""
from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from services.common import oip
from services.gen import inference_pb2 as ipb
from services.gen import inference_pb2_grpc as ipb_grpc
from services.tools.cluster import ClusterConfig, LocalCluster

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml"
PLAN = """
pipeline: ocr
allocations:
  - {task: det, variant: det_v6small_480, batch_size: 2, replicas: 1}
  - {task: rec, variant: rec_v6tiny, batch_size: 16, replicas: 1}
"""
ADDRESS = "127.0.0.1"
TIMEOUT_S = 60.0            # every call has one; generous for a loaded 2-core machine
BIG_REQUESTS = 50
BIG_BYTES = 7 * 1024 * 1024
# Bounds on the growth of the front door's peak RSS (VmHWM). The 50 concurrent ~7 MB
# requests are 350 MB of bodies. Without the in-flight limits every one of them is read and
# held while it is served, each page copied about three more times on its way to the
# worker (extracted image, Query, serialised InferBatch): measured 830-1,030 MB of growth
# (docs/reliability.md). With them the front door reads a body only when there is room
# for one more request of the largest allowed size (32 MiB in flight, at most 8 bodies
# being read), so the growth is the 4 requests it serves plus gRPC's buffers for the
# streams still arriving: measured 100-265 MB when the cap was 24 MiB (3 requests served). The burst bound is the 350 MB the bodies
# alone would take if they were all held at once; the module bound adds room for the other
# cases (a 20 MiB and a 9 MiB message, raw pixels), measured 170-340 MB in all.
BURST_GROWTH_BOUND_MB = 350.0
MODULE_GROWTH_BOUND_MB = 450.0
IDLE_KEPT_SHARE = 0.75   # of the peak's growth, at most still resident once the front door idled
FIGURES: dict[str, object] = {}


def vm_hwm_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak resident set size of a process (VmHWM; ``field="VmRSS"``: the current one), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    plan = tmp / "plan.yaml"
    plan.write_text(PLAN)
    c = LocalCluster(ClusterConfig(spec=SPEC, plan_file=plan, models=models_dir,
                                   workers={"det": 1, "rec": 1}, log_dir=tmp / "logs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPESERVE_IDLE_TRIM_S", "1")   # the processes read it at start
        c.start(ready_timeout_s=120)
    yield c
    codes = c.stop()
    assert all(code == 0 for code in codes.values()), c.exit_report(codes)


@pytest.fixture(scope="module")
def channel(cluster):
    with grpc.insecure_channel(cluster.front_door,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return ipb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def front_door_pid(cluster):
    return cluster.procs[f"router-{cluster.spec.root.name}"].popen.pid


@pytest.fixture(scope="module")
def baseline_rss(cluster, stub, eval_pages, front_door_pid):
    """The front door's peak RSS once warmed up by one normal request."""
    _, pages = eval_pages
    oip.parse_ocr_response(stub.ModelInfer(oip.build_image_request("ocr", pages[0].png), timeout=TIMEOUT_S))
    FIGURES["rss_peak_after_warmup_mb"] = vm_hwm_mb(front_door_pid)
    return FIGURES["rss_peak_after_warmup_mb"]


def refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details() or ""


def assert_clear(code, msg, want: grpc.StatusCode, *mentions: str) -> None:
    assert code == want, (code, msg)
    for m in mentions:
        assert m.lower() in msg.lower(), (m, msg)
    assert ADDRESS not in msg and "Traceback" not in msg, msg


def infer_request(image: bytes, **kw) -> ipb.ModelInferRequest:
    return oip.build_image_request("ocr", image, **kw)


def tensor_request(datatype: str, shape, raw: bytes | None = None) -> ipb.ModelInferRequest:
    req = ipb.ModelInferRequest(model_name="ocr")
    req.inputs.add(name="image", datatype=datatype, shape=list(shape))
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


# --------------------------------------------------------------------------- images


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def bomb_png(w: int, h: int) -> bytes:
    """A whole 1-bit PNG of w x h zeros, rows streamed through zlib (one row in memory):
    20,000 x 20,000 is ~49 KB here and 400 MB (1.2 GB as RGB) once decoded."""
    row = b"\0" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_claiming(w: int, h: int) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (255, 255, 255)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")   # SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def padded_page(png: bytes, size: int, seed: int) -> bytes:
    """A real page with an ancillary chunk of random bytes after IHDR, to ``size`` bytes:
    decoders skip the chunk, so the page still reads."""
    pad = size - len(png) - 12
    junk = np.random.default_rng(seed).integers(0, 256, pad, dtype=np.uint8).tobytes()
    return png[:33] + chunk(b"paDd", junk) + png[33:]


def noise_png(size: int, seed: int) -> bytes:
    """A valid PNG header (1600 x 1500 RGB) over an IDAT of random bytes: passes the
    header check, and the worker cannot inflate it."""
    body = np.random.default_rng(seed).integers(0, 256, size - 57, dtype=np.uint8).tobytes()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1600, 1500, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- cases


def test_empty_bytes_tensor(stub, baseline_rss):
    code, msg = refused(lambda: stub.ModelInfer(infer_request(b""), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "empty image")
    code, msg = refused(lambda: stub.ModelInfer(tensor_request("BYTES", [1]), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "holds 0 elements")


def test_truncated_png_passes_the_header_and_the_worker_refuses_it(stub, eval_pages, baseline_rss):
    _, pages = eval_pages
    png = pages[1].png
    cut = png[:len(png) // 2]
    assert oip.image_size(cut) == (pages[1].width, pages[1].height)   # the header is intact
    code, msg = refused(lambda: stub.ModelInfer(infer_request(cut), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded", "truncated")


def test_png_decompression_bomb_is_refused_from_its_header(stub, baseline_rss):
    bomb = bomb_png(20_000, 20_000)
    assert len(bomb) < 100_000
    t0 = time.perf_counter()
    code, msg = refused(lambda: stub.ModelInfer(infer_request(bomb), timeout=TIMEOUT_S))
    FIGURES["bomb_refused_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT,
                 "20000x20000, larger than the limit of 4096 pixels per side")
    # within max_side, over max_pixels (4096 x 4096 > 12,582,912 in pipelines/ocr.yaml)
    code, msg = refused(lambda: stub.ModelInfer(infer_request(bomb_png(4096, 4096)), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT,
                 "4096x4096 = 16777216 pixels, more than the limit of 12582912")


def test_jpeg_header_claiming_huge_dimensions(stub, baseline_rss):
    code, msg = refused(lambda: stub.ModelInfer(infer_request(jpeg_claiming(65000, 60000)),
                                                timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "65000x60000, larger than the limit")


def test_not_an_image(stub, baseline_rss):
    code, msg = refused(lambda: stub.ModelInfer(infer_request(b"GIF89a" + b"\0" * 100), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "not a PNG or JPEG")


@pytest.mark.parametrize("datatype", ["FP32", "INT8", "UINT16", "STRING", ""])
def test_wrong_datatype(stub, eval_pages, datatype, baseline_rss):
    _, pages = eval_pages
    req = infer_request(pages[0].png)
    req.inputs[0].datatype = datatype
    code, msg = refused(lambda: stub.ModelInfer(req, timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, f"datatype '{datatype}' not supported")


@pytest.mark.parametrize("datatype, shape, raw, says", [
    ("BYTES", [2], oip.encode_bytes_tensor([b"a", b"b"]), "must have shape [1], got [2]"),
    ("BYTES", [1, 1], oip.encode_bytes_tensor([b"a"]), "must have shape [1], got [1, 1]"),
    ("BYTES", [], oip.encode_bytes_tensor([b"a"]), "must have shape [1], got []"),
    ("UINT8", [40, 30], b"\0" * 1200, "must have shape [H, W, 3], got [40, 30]"),
    ("UINT8", [40, 30, 4], b"\0" * 4800, "must have shape [H, W, 3], got [40, 30, 4]"),
    ("UINT8", [40, -30, 3], b"", "negative dimension"),
    ("UINT8", [0, 30, 3], b"", "empty image"),
    ("UINT8", [2000, 2000, 3], None, "= 12000000 bytes exceeds the limit of 8388608"),
    ("UINT8", [10, 5000, 3], None, "5000x10, larger than the limit of 4096"),
])
def test_wrong_shape(stub, datatype, shape, raw, says, baseline_rss):
    code, msg = refused(lambda: stub.ModelInfer(tensor_request(datatype, shape, raw), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, says)


def test_uint8_raw_pixels(stub, eval_pages, baseline_rss):
    _, pages = eval_pages
    page = pages[2]
    import io
    with Image.open(io.BytesIO(page.png)) as im:
        pixels = np.asarray(im.convert("RGB"))
    resp = stub.ModelInfer(tensor_request("UINT8", pixels.shape, pixels.tobytes()), timeout=TIMEOUT_S)
    from_pixels = oip.parse_ocr_response(resp)
    from_png = oip.parse_ocr_response(stub.ModelInfer(infer_request(page.png), timeout=TIMEOUT_S))
    assert len(from_pixels) >= 0.8 * len(page.lines), "raw pixels read worse than the page"
    assert sorted(ln.text for ln in from_pixels) == sorted(ln.text for ln in from_png)
    # a small blank image is valid: answered, with no text read (the detector may still
    # report one empty region over the whole of so small an image)
    blank = np.full((32, 48, 3), 255, np.uint8)
    resp = stub.ModelInfer(tensor_request("UINT8", blank.shape, blank.tobytes()), timeout=TIMEOUT_S)
    lines = oip.parse_ocr_response(resp)
    assert all(ln.text.strip() == "" for ln in lines), lines
    assert all(0 <= x <= 48 and 0 <= y <= 32 for ln in lines
               for x, y in zip(ln.points[0::2], ln.points[1::2])), lines
    # byte counts that do not match the shape
    for n in (blank.nbytes - 1, blank.nbytes + 3, 0):
        code, msg = refused(lambda: stub.ModelInfer(
            tensor_request("UINT8", blank.shape, blank.tobytes()[:n] if n <= blank.nbytes
                           else blank.tobytes() + b"\0" * 3), timeout=TIMEOUT_S))
        assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT,
                     "empty image data" if n == 0 else f"but {n} bytes were sent")


def test_unknown_model(stub, eval_pages, baseline_rss):
    _, pages = eval_pages
    code, msg = refused(lambda: stub.ModelInfer(oip.build_image_request("nope", pages[0].png),
                                                timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'")


def test_random_bytes_as_the_protobuf_body(channel, baseline_rss):
    raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=None, response_deserializer=None)
    rng = np.random.default_rng(11)
    for n in (1, 100, 10_000, 1_000_000):
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        code, msg = refused(lambda: raw_call(body, timeout=TIMEOUT_S))
        assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "not a valid ModelInferRequest")


def test_oversize_payloads(stub, baseline_rss):
    # over max_bytes, within gRPC's receive limit: our message naming the limit
    nine = b"\x89PNG\r\n\x1a\n" + b"\0" * (9 << 20)
    code, msg = refused(lambda: stub.ModelInfer(infer_request(nine), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit of 8388608 bytes")
    # over the front door's receive limit (2 x max_bytes + 64 KiB): refused by gRPC itself
    twenty = b"\x89PNG\r\n\x1a\n" + b"\0" * (20 << 20)
    code, msg = refused(lambda: stub.ModelInfer(infer_request(twenty), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


def test_deadlines_that_cannot_be_made(stub, eval_pages, baseline_rss):
    _, pages = eval_pages
    code, msg = refused(lambda: stub.ModelInfer(infer_request(pages[0].png, timeout_ms=5), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.DEADLINE_EXCEEDED, "dropped on arrival")
    # dropped before the payload is read: a junk payload gets the same answer
    code, msg = refused(lambda: stub.ModelInfer(infer_request(b"junk", timeout_ms=5), timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.DEADLINE_EXCEEDED, "dropped on arrival")
    req = infer_request(pages[0].png)
    req.parameters["timeout"].string_param = "soon"
    code, msg = refused(lambda: stub.ModelInfer(req, timeout=TIMEOUT_S))
    assert_clear(code, msg, grpc.StatusCode.INVALID_ARGUMENT, "parameter 'timeout'")


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException
url, png_path = sys.argv[1], sys.argv[2]
client = tc.InferenceServerClient(url=url)
out = {}
inp = tc.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([open(png_path, "rb").read()], dtype=object))
out["texts"] = [t.decode() for t in client.infer("ocr", [inp]).as_numpy("text")]
page = open(png_path, "rb").read()
for name, data in (("truncated", page[:len(page) // 2]), ("cut_first_idat", page[:3000]),
                   ("junk", b"junk")):
    inp = tc.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([data], dtype=object))
    try:
        client.infer("ocr", [inp])
        out[name] = ["OK", ""]
    except InferenceServerException as exc:
        out[name] = [exc.status(), exc.message()]
print(json.dumps(out))
"""


def test_tritonclient_gets_the_same_answers(cluster, eval_pages, baseline_rss):
    """ModelInfer is registered stream-unary (to shed before reading): a unary client such
    as tritonclient (run as its own program, see tests/integration/test_cluster.py) sees
    no difference."""
    import json
    import subprocess
    import sys

    pages_dir, pages = eval_pages
    done = subprocess.run([sys.executable, "-c", TRITON_CLIENT, cluster.front_door,
                           str(pages_dir / "p004.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert len(got["texts"]) >= 0.8 * len(pages[4].lines)
    assert got["truncated"][0] == "StatusCode.INVALID_ARGUMENT" and "could not be decoded" in got["truncated"][1]
    assert got["cut_first_idat"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "image data is truncated" in got["cut_first_idat"][1]   # seen at the header check
    assert got["junk"][0] == "StatusCode.INVALID_ARGUMENT" and "not a PNG or JPEG" in got["junk"][1]
    assert ADDRESS not in done.stdout


def test_fifty_concurrent_7mb_requests_each_get_one_clear_status(cluster, eval_pages, front_door_pid,
                                                                 baseline_rss):
    _, pages = eval_pages
    payloads = []
    for i in range(BIG_REQUESTS):
        if i % 5 == 4:
            payloads.append(("noise", noise_png(BIG_BYTES, i)))
        else:
            payloads.append(("page", padded_page(pages[i % len(pages)].png, BIG_BYTES, i)))
    before = vm_hwm_mb(front_door_pid)

    async def one(stub, kind, image):
        try:
            resp = await stub.ModelInfer(infer_request(image), timeout=TIMEOUT_S)
            oip.parse_ocr_response(resp)
            return kind, grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            return kind, exc.code(), exc.details() or ""

    async def all_at_once():
        async with grpc.aio.insecure_channel(
                cluster.front_door, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = ipb_grpc.GRPCInferenceServiceStub(ch)
            t0 = time.perf_counter()
            results = await asyncio.wait_for(
                asyncio.gather(*[one(stub, kind, image) for kind, image in payloads]), 3 * TIMEOUT_S)
            return results, time.perf_counter() - t0

    results, elapsed = asyncio.run(all_at_once())
    after = vm_hwm_mb(front_door_pid)
    tally = Counter((kind, code.name) for kind, code, _ in results)
    FIGURES.update(big_requests=BIG_REQUESTS, big_request_mb=round(BIG_BYTES / 2**20, 1),
                   big_elapsed_s=round(elapsed, 2), big_statuses=dict(sorted(tally.items())),
                   rss_peak_before_big_mb=before, rss_peak_after_big_mb=after)
    assert len(results) == BIG_REQUESTS   # every call answered: none hung
    # a page is answered or shed; a noise PNG is refused by the worker or shed; either may
    # miss its deadline on a busy machine, but few may: what the front door admits it can
    # serve in time (without the limits 14-41 of the 50 missed it, see docs/reliability.md)
    allowed = {"page": {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.DEADLINE_EXCEEDED},
               "noise": {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.DEADLINE_EXCEEDED}}
    mentions = {grpc.StatusCode.RESOURCE_EXHAUSTED: "retry later",
                grpc.StatusCode.INVALID_ARGUMENT: "could not be decoded",
                grpc.StatusCode.DEADLINE_EXCEEDED: "deadline"}
    for kind, code, msg in results:
        assert code in allowed[kind], (kind, code, msg)
        if code != grpc.StatusCode.OK:
            assert_clear(code, msg, code, mentions[code])
    assert tally[("page", "OK")] >= 1, tally
    assert sum(n for (_, c), n in tally.items() if c == "DEADLINE_EXCEEDED") <= 5, tally
    assert sum(n for (_, c), n in tally.items() if c == "RESOURCE_EXHAUSTED") >= 1, \
        f"50 concurrent 7 MB requests and none shed by the 32 MiB in-flight cap: {tally}"
    assert after - before < BURST_GROWTH_BOUND_MB, FIGURES


def test_still_serves_and_peak_rss_stayed_bounded(cluster, stub, eval_pages, front_door_pid, baseline_rss):
    """Last in the module: after every case above the front door still answers, and its
    peak RSS grew by less than the bound (see MODULE_GROWTH_BOUND_MB)."""
    _, pages = eval_pages
    lines = oip.parse_ocr_response(stub.ModelInfer(infer_request(pages[3].png), timeout=TIMEOUT_S))
    assert len(lines) >= 0.8 * len(pages[3].lines)
    peak = vm_hwm_mb(front_door_pid)
    FIGURES["rss_peak_at_end_mb"] = peak
    FIGURES["rss_now_at_end_mb"] = vm_hwm_mb(front_door_pid, "VmRSS")   # what it keeps after the bursts
    # Idle, a tuned front door hands the pages it kept for the next request back to the
    # kernel (services/common/memory.py; PIPESERVE_IDLE_TRIM_S=1 for this cluster). Measured:
    # before that it holds 0.91-1.0 of its peak's growth, a second later 0.38-0.45 (at
    # glibc's defaults, PIPESERVE_MALLOC_TUNING=off, pages go back as they are freed and it
    # holds 0.5-0.74 at once; nothing is asserted then).
    grown = peak - baseline_rss
    tuned = "outcome=tuned" in (cluster.cfg.log_dir / f"router-{cluster.spec.root.name}.log").read_text()
    until = time.monotonic() + (15.0 if tuned else 2.0)
    while (now := vm_hwm_mb(front_door_pid, "VmRSS")) - baseline_rss > IDLE_KEPT_SHARE * grown \
            and time.monotonic() < until:
        time.sleep(0.5)
    FIGURES["rss_after_idle_mb"] = now
    print("\nbad-input figures:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in FIGURES.items()})
    assert peak - baseline_rss < MODULE_GROWTH_BOUND_MB, FIGURES
    if tuned:
        assert now - baseline_rss <= IDLE_KEPT_SHARE * grown, FIGURES
