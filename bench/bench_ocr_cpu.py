"""CPU milliseconds per page for each stage of the OCR work around and in the models, before
and after the data-path changes of issue 20 (item 2), in one run.

    .venv/bin/python bench/bench_ocr_cpu.py                          # ~2 minutes
    .venv/bin/python bench/bench_ocr_cpu.py --det det_v6small_480 --rec rec_v6small --buckets off

Two configurations, page by page in turn (so a change in the host's load hits both alike):

- **before**: the page's PNG decoded by Pillow (``decode_image(fast_png=False)``), float
  models, the CPU normalises (``fold_normalisation: false``), JPEG q95 crops;
- **after**: the page's PNG decoded by OpenCV (what ``decode_image`` does), the folded
  ``.u8.onnx`` models (uint8 input, normalisation in the graph) and raw tensor crops
  (``crop_format: raw``, no encoding).

Every page of ``data/eval`` goes through the same functions the processors use, one stage at
a time, each timed by this process's CPU clock (``time.process_time``; ONNX Runtime on one
intra-op thread, in the calling thread, as in the workers): page decode, det resize
(+ normalise) + pad, det model, DB boxes, crop warp, crop encode (at det), crop transport
(what carrying the page's crops costs gRPC: the det worker's reply, the det router's call to
the rec router and the rec router's call to the rec worker, each serialised, sent over a
loopback gRPC channel to a server in this process and parsed there, both ends' CPU), crop
decode (at rec), rec resize (+ normalise) + pad, rec model (batches of ``--rec-batch`` per
page, within a bucket) and rec batch + CTC decode (``run_batch`` less the model).

Printed: the mean CPU ms per page of each stage in each configuration and after/before; the
models' part is what a GPU would take over, the rest is what stays on the host's cores. Also
the CPU cost of the two uint8 layouts a folded model could take (the padded copy, NHWC as
built, against NCHW) and the crops' bytes per page in each format.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services.common.onnx import create_session  # noqa: E402
from services.common.processing import make_processor, split_by_bucket  # noqa: E402
from services.common.spec import ShapeBuckets, load_spec  # noqa: E402
from services.gen import pipeserve_pb2 as pb  # noqa: E402
from services.ocr.geometry import crop_quad, db_boxes, reading_order  # noqa: E402
from services.ocr.pages import load_pages  # noqa: E402
from services.ocr.processors import _feeds, decode_image, encode_image  # noqa: E402

STAGES = ("page decode", "det preprocess", "det model", "DB boxes", "crop warp", "crop encode",
          "crop transport", "crop decode", "rec preprocess", "rec model", "rec batch + CTC")
MODEL_STAGES = ("det model", "rec model")
CONFIGS = {"before": {"fold_normalisation": False, "crop_format": "jpeg"},
           "after": {"fold_normalisation": True, "crop_format": "raw"}}
FAST_PNG = {"before": False, "after": True}   # the page's PNG decoded by Pillow, or by OpenCV
HOPS = (("det worker -> det router", pb.InferBatchResponse), ("det router -> rec router", pb.RouteRequest),
        ("rec router -> rec worker", pb.InferBatchRequest))


class Clock:
    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        self.ms[stage] += (time.process_time() - t0) * 1e3
        return out


class TimedSession:
    """A session whose ``run`` is charged to ``clock``'s "rec model" stage."""

    def __init__(self, session, clock: Clock):
        self.session, self.clock = session, clock

    def run(self, outputs, feeds):
        return self.clock("rec model", self.session.run, outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


class Transport:
    """A loopback gRPC server in this process that parses each message it gets as its hop's
    protobuf type and answers one byte; :meth:`carry` sends a page's crops over the three
    hops they take in the cluster (client and server CPU both land in this process)."""

    def __init__(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        handlers = {f"H{i}": grpc.unary_unary_rpc_method_handler(self._parser(msg))
                    for i, (_, msg) in enumerate(HOPS)}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Crops", handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        self.calls = [self.channel.unary_unary(f"/bench.Crops/H{i}") for i in range(len(HOPS))]

    @staticmethod
    def _parser(msg):
        def handle(request: bytes, context) -> bytes:
            msg.FromString(request)
            return b"k"
        return handle

    def carry(self, payloads: list[bytes]) -> None:
        queries = [pb.Query(query_id=f"r.0.{i}", payload=p) for i, p in enumerate(payloads)]
        messages = (pb.InferBatchResponse(results=[pb.QueryResult(query_id="r.0", child_payloads=payloads)]),
                    pb.RouteRequest(request_id="r", queries=queries, upstream_path="det"),
                    pb.InferBatchRequest(request_id="r", task="rec", queries=queries))
        for call, message in zip(self.calls, messages):
            call(message.SerializeToString())

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


def one_page(png: bytes, det, det_sess, rec, rec_sess, rec_batch: int, transport: Transport, clock: Clock,
             sizes: list[int], fast_png: bool) -> int:
    image = clock("page decode", decode_image, png, det.max_side, fast_png)
    prep = clock("det preprocess", det.prepare_image, image)
    valid = [prep.meta["valid"]] if det.folded else None
    outputs, feeds = _feeds(det.variant, det_sess, prep.data[None], valid)
    prob = clock("det model", lambda: det_sess.run(outputs, feeds)[0])
    prob = prob[0].reshape(prob.shape[-2:])
    rh, rw = prep.meta["valid"]
    found = clock("DB boxes", db_boxes, prob[:rh, :rw], det.db)
    h, w = image.shape[:2]
    boxes = []
    for box, _ in found:
        box = box / prep.meta["scale"]
        box[:, 0] = np.clip(box[:, 0], 0, w)
        box[:, 1] = np.clip(box[:, 1], 0, h)
        boxes.append(box)
    crops = [clock("crop warp", crop_quad, image, boxes[i]) for i in reading_order(boxes)]
    payloads = [clock("crop encode", encode_image, c, det.crop_format, det.crop_quality) for c in crops]
    sizes.extend(len(p) for p in payloads)
    clock("crop transport", transport.carry, payloads)
    items = [clock("rec preprocess", rec.prepare_image, clock("crop decode", decode_image, p, rec.max_side))
             for p in payloads]
    timed = TimedSession(rec_sess, clock)
    for start in range(0, len(items), rec_batch):
        chunk = items[start:start + rec_batch]
        for idx in split_by_bucket(chunk):
            t0, model0 = time.process_time(), clock.ms["rec model"]
            rec.run_batch(timed, [chunk[i] for i in idx])
            clock.ms["rec batch + CTC"] += (time.process_time() - t0) * 1e3 - (clock.ms["rec model"] - model0)
    return len(items)


def layout_ms(pages, det, rec) -> dict[str, float]:
    """CPU ms per page of the padded uint8 copy a folded model is fed, as NHWC (what the
    processors build) and as NCHW (the other choice): det's resized page and 12 line crops
    (48 x 120 into the 160 bucket, cut from it; ~11 a page), 5 rounds; the resizes are
    made before the timing."""
    import cv2

    det_in = []
    for page in pages:
        prep = det.prepare_image(decode_image(page.png))
        rh, rw = prep.meta["valid"]
        img = np.ascontiguousarray(prep.data[:rh, :rw])
        crops = [cv2.resize(img[:40, k * 8: k * 8 + 100], (120, rec.height)) for k in range(12)]
        det_in.append((prep.bucket, img, crops))
    out = {}
    for layout in ("NHWC", "NCHW"):
        t0 = time.process_time()
        for _ in range(5):
            for (bh, bw), img, crops in det_in:
                if layout == "NHWC":
                    data = np.zeros((bh, bw, 3), np.uint8)
                    data[:img.shape[0], :img.shape[1]] = img
                else:
                    data = np.zeros((3, bh, bw), np.uint8)
                    data[:, :img.shape[0], :img.shape[1]] = img.transpose(2, 0, 1)
                for crop in crops:
                    if layout == "NHWC":
                        line = np.zeros((rec.height, 160, 3), np.uint8)
                        line[:, :120] = crop
                    else:
                        line = np.zeros((3, rec.height, 160), np.uint8)
                        line[:, :, :120] = crop.transpose(2, 0, 1)
        out[layout] = (time.process_time() - t0) * 1e3 / (5 * len(det_in))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "pipelines" / "ocr.yaml")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--pages", type=Path, default=ROOT / "data" / "eval")
    ap.add_argument("--det", default="det_v6small_320")
    ap.add_argument("--rec", default="rec_v6tiny")
    ap.add_argument("--rec-batch", type=int, default=8)
    ap.add_argument("--buckets", choices=("on", "off"), default="on",
                    help="the spec's shape buckets, or every variant's buckets: off")
    args = ap.parse_args(argv)
    spec, pages = load_spec(args.spec), load_pages(args.pages)
    setups = {}
    for config, settings in CONFIGS.items():
        procs = []
        for name in (args.det, args.rec):
            v = spec.variant(name)
            v = dataclasses.replace(v, settings={**v.settings, **settings})
            if args.buckets == "off":
                v = dataclasses.replace(v, buckets=ShapeBuckets.none())
            proc = make_processor(v, args.models, spec.plugins)
            if proc.folded is None and settings["fold_normalisation"]:
                raise SystemExit(f"{name}: no folded model under {args.models} (run `make models`)")
            session, _ = create_session(proc.model_path, prefer_gpu=False, intra_op_threads=1)
            procs += [proc, session]
        setups[config] = procs
    transport = Transport()
    try:
        for config, procs in setups.items():
            for page in pages[:2]:                     # first runs allocate: not counted
                one_page(page.png, *procs, args.rec_batch, transport, Clock(), [], FAST_PNG[config])
        clocks = {c: Clock() for c in setups}
        sizes: dict[str, list[int]] = {c: [] for c in setups}
        lines = 0
        for page in pages:
            for config, procs in setups.items():
                lines += one_page(page.png, *procs, args.rec_batch, transport, clocks[config], sizes[config],
                                  FAST_PNG[config])
    finally:
        transport.close()
    n = len(pages)
    before, after = clocks["before"].ms, clocks["after"].ms
    print(f"{n} pages ({lines // 2} lines), {args.det} + {args.rec}, buckets {args.buckets}, rec batches of "
          f"{args.rec_batch}, ONNX Runtime on one thread: CPU ms per page")
    print(f"  before: {CONFIGS['before']}, page PNG by Pillow; after: {CONFIGS['after']}, page PNG by OpenCV")
    print(f"  {'stage':18s} {'before':>8s} {'after':>8s}  after/before")
    for stage in STAGES:
        ratio = f"{after[stage] / before[stage]:6.2f}" if before[stage] > 0 else "     -"
        print(f"  {stage:18s} {before[stage] / n:8.2f} {after[stage] / n:8.2f}  {ratio}")
    for label, ms in (("before", before), ("after", after)):
        total = sum(ms.values())
        model = sum(ms[s] for s in MODEL_STAGES)
        print(f"  total {label:6s} {total / n:8.2f}: models {model / n:.2f}, the rest {(total - model) / n:.2f}")
    rest_b = sum(before.values()) - sum(before[s] for s in MODEL_STAGES)
    rest_a = sum(after.values()) - sum(after[s] for s in MODEL_STAGES)
    print(f"  the rest (what stays on the CPU beside a GPU), after/before: {rest_a / rest_b:.2f} "
          f"({(rest_b - rest_a) / n:.2f} ms per page less)")
    print(f"  crop bytes per page: {CONFIGS['before']['crop_format']} {sum(sizes['before']) / n:,.0f}, "
          f"{CONFIGS['after']['crop_format']} {sum(sizes['after']) / n:,.0f}")
    det, rec = setups["after"][0], setups["after"][2]
    lay = layout_ms(pages, det, rec)
    print(f"  folded input layout, the padded uint8 copy (det page + 12 crops): NHWC {lay['NHWC']:.3f} ms "
          f"per page, NCHW {lay['NCHW']:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
