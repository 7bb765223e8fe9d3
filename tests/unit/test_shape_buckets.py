"""Shape buckets: the spec field, the worker's batching within a bucket and its warm-up of
every (bucket, batch size), and the CUDA provider options (no GPU, no ONNX, no sockets)."""
import asyncio
import threading
import time
from pathlib import Path

import pytest

from services.common.errors import SpecError
from services.common.onnx import cuda_provider_options, create_session
from services.common.processing import ItemResult, Prepared, Processor, RegionOut
from services.common.spec import ShapeBuckets, load_spec, parse_spec
from services.worker.core import ModelHost, Status, WorkerCore, warm_batch_sizes

ROOT = Path(__file__).resolve().parents[2]


def spec_with(buckets=None, omit=False):
    variant = {"name": "v1", "model": "m", "processor": "fake"}
    if not omit:
        variant["buckets"] = buckets
    return parse_spec({"name": "p", "slo_ms": 1000, "tasks": [{"name": "t", "variants": [
        variant, {"name": "v2", "model": "m", "processor": "fake"}]}]}, source="x.yaml")


# -- the spec field ------------------------------------------------------------------

def test_spec_buckets_parse_widths_aspects_and_off():
    assert spec_with(omit=True).variant("v1").buckets is None         # the processor kind's default
    assert spec_with({"widths": [80, 160, 320]}).variant("v1").buckets == ShapeBuckets(widths=(80, 160, 320))
    assert spec_with({"aspects": ["1:1", "4:3", " 3 : 4 "]}).variant("v1").buckets == ShapeBuckets(
        aspects=((1, 1), (4, 3), (3, 4)))
    assert spec_with(False).variant("v1").buckets == ShapeBuckets.none()   # YAML reads `off` as false
    assert spec_with("off").variant("v1").buckets.off


@pytest.mark.parametrize("value, field, message", [
    ({"widths": [320, 160]}, "buckets.widths", "strictly increasing"),
    ({"widths": [0, 160]}, "buckets.widths", "positive whole numbers"),
    ({"widths": [80.5]}, "buckets.widths", "positive whole numbers"),
    ({"widths": [True]}, "buckets.widths", "positive whole numbers"),
    ({"widths": []}, "buckets.widths", "1 to 8 buckets"),
    ({"widths": list(range(1, 10))}, "buckets.widths", "1 to 8 buckets"),
    ({"aspects": ["4x3"]}, "buckets.aspects", "W:H"),
    ({"aspects": ["0:1"]}, "buckets.aspects", "W:H"),
    ({"aspects": ["1:1", "2:2"]}, "buckets.aspects", "repeats"),
    ({"heights": [48]}, "buckets.heights", "unknown field"),
    ({"widths": [320], "aspects": ["1:1"]}, "buckets", "not both"),
    ([320, 640], "buckets", "must be"),
    ("on", "buckets", "must be"),
])
def test_spec_bucket_errors_name_the_field(value, field, message):
    with pytest.raises(SpecError, match=message) as err:
        spec_with(value)
    assert f"tasks[0].variants[0].{field}" in str(err.value)


def test_the_pipelines_declare_buckets_that_load():
    for name in ("ocr.yaml", "ocr_tree.yaml"):
        spec = load_spec(ROOT / "pipelines" / name)
        for task in spec.tasks:
            for v in task.variants:
                if v.processor == "ppocr_cls":
                    continue                    # one input shape (height x width) already
                assert v.buckets is not None and not v.buckets.off, (name, v.name)


# -- the worker: batches within a bucket, warm-up ------------------------------------

class BucketProcessor(Processor):
    """A payload b"w<width>" is prepared into bucket <width>; records every batch's buckets."""

    def __init__(self, variant, buckets=(80, 320)):
        super().__init__(variant, ".")
        self.buckets = buckets
        self.batches = []       # the buckets of each run_batch call's items
        self.sizes = []         # (bucket, batch size) of each call

    def prepare(self, payload):
        return Prepared(payload, bucket=int(payload[1:]))

    def shape_buckets(self):
        return self.buckets

    def warmup_items(self):
        return [Prepared(b"w%d" % b, bucket=b) for b in self.buckets]

    def run_batch(self, session, items):
        self.batches.append(sorted({it.bucket for it in items}))
        self.sizes.append((items[0].bucket, len(items)))
        time.sleep(0.002)
        return [ItemResult(regions=(RegionOut(text=it.data.decode()),)) for it in items]


def test_warm_batch_sizes_are_every_size_on_a_gpu_and_batch_1_on_a_cpu():
    assert warm_batch_sizes(4, gpu=True) == (1, 2, 3, 4)
    assert warm_batch_sizes(4, gpu=False) == (1,)
    assert warm_batch_sizes(1, gpu=False) == warm_batch_sizes(0, gpu=True) == (1,)


def test_warm_up_runs_every_bucket_at_every_size_once_and_only_new_ones_later():
    spec = spec_with(omit=True)
    proc = BucketProcessor(spec.variant("v1"))
    host = ModelHost(spec.variant("v1"), proc, session=None, providers=["CUDAExecutionProvider"])
    assert not host.needs_warm_up(2)           # never warmed (a host made by hand): nothing known to warm
    host.warm_up(2)
    # the first pair twice (a fresh session's first run allocates), every other once
    assert proc.sizes == [(80, 1), (80, 1), (80, 2), (320, 1), (320, 2)]
    assert not host.needs_warm_up(2) and host.needs_warm_up(3)
    proc.sizes.clear()
    host.warm_up(3)
    assert proc.sizes == [(80, 3), (320, 3)]
    cpu = ModelHost(spec.variant("v1"), BucketProcessor(spec.variant("v1")), session=None, providers=[])
    cpu.warm_up(8)
    assert cpu.processor.sizes == [(80, 1), (80, 1), (320, 1)]


def make_core(batch_size_seen):
    spec = spec_with(omit=True)
    procs = {}

    def loader(variant):
        procs[variant.name] = BucketProcessor(variant)
        host = ModelHost(variant, procs[variant.name], session=None, providers=["CUDAExecutionProvider"])
        batch_size_seen.append(core.batch_size)
        host.warm_up(core.batch_size)        # as ModelHost.load does, with the plan's batch size
        return host

    core = WorkerCore("w", spec.task("t"), ".", loader=loader)
    return core, procs


def test_a_batch_never_mixes_buckets_and_answers_keep_their_order():
    async def scenario():
        seen = []
        core, procs = make_core(seen)
        core.start()
        await core.apply("v1", 4, plan_version=1)
        procs["v1"].batches.clear()
        payloads = [b"w80", b"w320", b"w80", b"w320", b"w320", b"w80", b"w80", b"w80"]
        outs = await asyncio.gather(
            core.submit([(f"a{i}", p) for i, p in enumerate(payloads)], time.time() + 10),
            core.submit([(f"b{i}", p) for i, p in enumerate(reversed(payloads))], time.time() + 10))
        await core.stop()
        return seen, procs["v1"], outs

    seen, proc, (first, second) = asyncio.run(scenario())
    assert seen == [4]                           # warmed for the plan's batch size
    assert all(len(b) == 1 for b in proc.batches), proc.batches
    assert sum(size for _, size in proc.sizes[-len(proc.batches):]) == 16
    assert all(o.status is Status.OK for o in first + second)
    assert [o.result.regions[0].text for o in first] == ["w80", "w320", "w80", "w320", "w320", "w80", "w80", "w80"]
    assert [o.query_id for o in second] == [f"b{i}" for i in range(8)]


def test_a_plan_with_a_larger_batch_warms_the_new_sizes_before_it_returns():
    async def scenario():
        core, procs = make_core([])
        core.start()
        await core.apply("v1", 2, plan_version=1)
        proc = procs["v1"]
        proc.sizes.clear()
        changed = await core.apply("v1", 3, plan_version=2)   # same variant, bigger batch
        warmed = list(proc.sizes)
        await core.apply("v1", 2, plan_version=3)             # smaller: nothing new
        await core.stop()
        return changed, warmed, proc.sizes

    changed, warmed, after = asyncio.run(scenario())
    assert changed is False and warmed == [(80, 3), (320, 3)] and after == warmed


def test_the_warm_up_counts_in_the_load_time_the_worker_logs():
    from structlog.testing import capture_logs

    class SlowWarm(BucketProcessor):
        def run_batch(self, session, items):
            time.sleep(0.05)    # each warm-up run: at least 50 ms
            return super().run_batch(session, items)

    spec = spec_with(omit=True)

    def loader(variant):
        host = ModelHost(variant, SlowWarm(variant), session=None, providers=["CUDAExecutionProvider"])
        host.warm_up(core.batch_size)
        return host

    core = WorkerCore("w", spec.task("t"), ".", loader=loader)

    async def scenario():
        with capture_logs() as logs:
            await core.apply("v1", 2, plan_version=1)
        return logs

    logs = asyncio.run(scenario())
    loaded = [e for e in logs if e["event"] == "variant_loaded"]
    # 2 buckets x sizes 1, 2, the first pair twice: 5 runs of at least 50 ms
    assert loaded and loaded[0]["load_ms"] >= 5 * 50 and core.last_load_ms >= 5 * 50


# -- CUDA provider options -------------------------------------------------------------

def test_cuda_provider_options_carry_the_cudnn_search_mode():
    assert cuda_provider_options() == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_provider_options(1, "exhaustive") == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert cuda_provider_options(0, "DEFAULT")["cudnn_conv_algo_search"] == "DEFAULT"
    with pytest.raises(ValueError, match="EXHAUSTIVE, HEURISTIC, DEFAULT"):
        cuda_provider_options(0, "FAST")


def test_a_bad_search_mode_fails_on_a_cpu_host_too(tmp_path):
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        create_session(tmp_path / "missing.onnx", cudnn_conv_algo_search="FAST")


@pytest.mark.parametrize("flag, env, field, default, given, got, from_env, bad", [
    ("--cudnn-conv-algo-search", "PIPESERVE_CUDNN_CONV_ALGO_SEARCH", "cudnn_conv_algo_search",
     "HEURISTIC", "exhaustive", "EXHAUSTIVE", "DEFAULT", "FAST"),
    ("--batch-padding", "PIPESERVE_BATCH_PADDING", "batch_padding", "auto", "on", "on", "off", "sometimes"),
])
def test_the_worker_flags_and_their_environment_variables(monkeypatch, flag, env, field, default, given, got,
                                                          from_env, bad):
    from services.worker.main import parse_config

    base = ["--spec", "pipelines/ocr.yaml", "--controller", "c:1", "--redis-url", "redis://x"]
    monkeypatch.delenv(env, raising=False)
    assert getattr(parse_config(base), field) == default
    assert getattr(parse_config(base + [flag, given]), field) == got
    monkeypatch.setenv(env, from_env)
    assert getattr(parse_config(base), field) == from_env
    monkeypatch.setenv(env, bad)
    with pytest.raises(SystemExit):
        parse_config(base)


# --------------------------------------------------------------------------- batch padding


def test_padded_batch_is_the_next_power_of_two():
    from services.common.onnx import padded_batch
    assert [padded_batch(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert padded_batch(32) == 32 and padded_batch(33) == 64


def test_padding_is_on_for_the_cuda_provider_under_auto():
    from services.common.onnx import pads_batches
    assert pads_batches("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not pads_batches("auto", ["CPUExecutionProvider"])
    assert pads_batches("on", ["CPUExecutionProvider"]) and not pads_batches("off", ["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="batch padding"):
        pads_batches("always", ["CPUExecutionProvider"])


class _RecordingSession:
    """Answers each row with its own sum (batch-first) plus a per-run scalar output."""

    def __init__(self):
        self.batches = []

    def run(self, outputs, feeds):
        import numpy as np
        (x,) = feeds.values()
        self.batches.append(x.copy())
        return [x.reshape(len(x), -1).sum(axis=1), np.float32(len(x))]

    def get_inputs(self):
        return ["passed through"]


def test_a_padded_session_feeds_a_power_of_two_batch_of_real_rows_and_cuts_the_outputs_back():
    import numpy as np
    from services.common.onnx import BatchPaddedSession
    inner = _RecordingSession()
    s = BatchPaddedSession(inner)
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)      # rows [0,1] [2,3] [4,5]
    sums, runs = s.run(None, {"x": x})
    assert inner.batches[0].shape == (4, 2)                      # 3 -> 4
    assert inner.batches[0][3].tolist() == [4.0, 5.0]            # the last row again, not zeros
    assert sums.tolist() == [1.0, 5.0, 9.0] and float(runs) == 4.0   # cut back to 3; a scalar untouched
    s.run(None, {"x": x[:2]})
    assert inner.batches[1].shape == (2, 2)                      # a power of two already: as is
    assert s.get_inputs() == ["passed through"]


def test_with_padding_a_gpu_warms_the_powers_of_two_only():
    assert warm_batch_sizes(32, gpu=True, padded=True) == (1, 2, 4, 8, 16, 32)
    assert warm_batch_sizes(6, gpu=True, padded=True) == (1, 2, 4, 8)   # a batch of 5 or 6 runs at 8
    assert warm_batch_sizes(8, gpu=False, padded=True) == (1,)          # a CPU: batch 1, as unpadded
