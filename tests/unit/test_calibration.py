"""The profile calibration from measured batch times (services/policy/calibration.py)."""
import pytest

from services.planner import parse_profile
from services.policy.calibration import LatencyCalibrator, Timing, scale_profile

PROFILE = parse_profile({"name": "p", "slo_ms": 1000, "tasks": [
    {"name": "det", "children": ["rec"], "fan_out": {"d1": {"rec": 10.0}, "d2": {"rec": 10.0}}, "variants": [
        {"name": "d1", "accuracy": 1.0, "latency_ms": {"1": {"p50_ms": 100, "p95_ms": 120},
                                                       "4": {"p50_ms": 400, "p95_ms": 480}}},
        {"name": "d2", "accuracy": 0.9, "latency_ms": {"1": {"p50_ms": 20, "p95_ms": 25}}}]},
    {"name": "rec", "variants": [
        {"name": "r1", "accuracy": 1.0, "latency_ms": {"1": {"p50_ms": 5, "p95_ms": 6},
                                                       "8": {"p50_ms": 40, "p95_ms": 48}}}]}]})


def test_nothing_is_trusted_before_the_batch_floor():
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    cal.observe([Timing("det", "d1", 1, 9, 9 * 200.0)])
    assert cal.host_factor() is None and cal.factors()[("det", "d1")] == 1.0
    assert cal.calibrated() is PROFILE            # nothing measured: the profile itself
    cal.observe([Timing("det", "d1", 1, 1, 200.0)])
    assert cal.factors()[("det", "d1")] == pytest.approx(2.0)


def test_measured_variants_get_their_factor_and_the_others_the_host_factor():
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    cal.observe([Timing("det", "d1", 4, 10, 10 * 800.0),      # 2x the profile at batch 4
                 Timing("rec", "r1", 8, 30, 30 * 40.0 * 3)])   # 3x at batch 8
    f = cal.factors()
    assert f[("det", "d1")] == pytest.approx(2.0) and f[("rec", "r1")] == pytest.approx(3.0)
    host = (2.0 ** 10 * 3.0 ** 30) ** (1 / 40)                 # batch-weighted geometric mean
    assert f[("det", "d2")] == pytest.approx(host)
    p = cal.calibrated()
    assert p.task("det").variant("d1").latency_ms[1].p50_ms == pytest.approx(200.0)
    assert p.task("det").variant("d2").latency_ms[1].p95_ms == pytest.approx(25 * host)


def test_partial_batches_scale_the_next_profiled_size():
    cal = LatencyCalibrator(PROFILE, min_batches=1)
    cal.observe([Timing("rec", "r1", 4, 5, 5 * 20.0)])   # 4 of the 8-batch's 40 ms = 20 ms: as profiled
    assert cal.factors()[("rec", "r1")] == pytest.approx(1.0)


def test_drift_and_replan_need_a_move_past_the_margin():
    cal = LatencyCalibrator(PROFILE, min_batches=1, margin=0.3)
    cal.observe([Timing("det", "d1", 1, 20, 20 * 100.0)])
    cal.calibrated()
    assert not cal.needs_replan()
    cal.observe([Timing("det", "d1", 1, 1000, 1000 * 125.0)])   # +25 %: within the margin
    assert not cal.needs_replan()
    cal.observe([Timing("det", "d1", 1, 1000, 1000 * 200.0)])   # 2x: past it
    assert cal.needs_replan() and cal.drift() == pytest.approx(1.0, rel=0.05)


def test_the_first_batches_are_a_plain_mean_not_the_first_report():
    cal = LatencyCalibrator(PROFILE, min_batches=10, alpha=0.03)
    cal.observe([Timing("det", "d1", 1, 2, 2 * 400.0)])    # two slow warm-up batches (4x)
    cal.observe([Timing("det", "d1", 1, 18, 18 * 200.0)])  # then 2x
    assert cal.factors()[("det", "d1")] == pytest.approx((2 * 4 + 18 * 2) / 20)


def test_a_detectors_measured_fan_out_replaces_the_profiles():
    cal = LatencyCalibrator(PROFILE, min_batches=5)
    cal.observe([Timing("det", "d1", 1, 5, 5 * 100.0, items=5, regions=60)])
    assert cal.calibrated().task("det").fan_out["d1"] == {"rec": 12.0}


def test_scale_profile_keeps_everything_but_latencies():
    p = scale_profile(PROFILE, {("det", "d1"): 2.0}, note="x")
    assert p.task("det").variant("d1").latency_ms[4].p95_ms == 960
    assert p.task("det").variant("d2").latency_ms[1].p50_ms == 20
    assert p.task("det").variant("d1").accuracy == 1.0 and p.task("det").fan_out == PROFILE.task("det").fan_out
    assert "Calibrated: x." in p.provenance


def test_seeding_from_a_plans_calibration_plans_on_the_measured_speed():
    """A restarted controller seeds its calibrator from the adopted plan's factors."""
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    taken = cal.seed({"det/d1": 2.0, "rec/r1": 3.0, "det/nope": 5.0, "rec/r1x": 1.0, "det/d2": -1.0})
    assert taken == 2
    f = cal.factors()
    assert f[("det", "d1")] == pytest.approx(2.0) and f[("rec", "r1")] == pytest.approx(3.0)
    assert cal.calibrated().task("det").variant("d1").latency_ms[1].p50_ms == pytest.approx(200.0)
    assert not cal.needs_replan()      # the seeded factors are the ones in use
    # later measurements move it as usual
    cal.observe([Timing("det", "d1", 1, 100, 100 * 100.0)])
    assert cal.factors()[("det", "d1")] < 2.0


# -- stalls are not speed (a cold shape's cuDNN search, a model load) ---------------------

def normal(task, variant, size, n, ms):
    return Timing(task, variant, size, n, n * ms, max_ms=ms)


def test_a_few_multi_second_stalls_among_normal_batches_leave_the_host_factor_near_1():
    """The GPU run's failure: 0.4-2.9 s first calls at new shapes among 5-100 ms batches
    read as a host 143-179x slower. Every kind of stall at once, the profile's own speed
    otherwise."""
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    cal.observe([Timing("det", "d1", 1, 1, 2900.0, max_ms=2900.0)])        # the very first batch: a new shape
    cal.observe([normal("det", "d1", 1, 4, 100.0), normal("rec", "r1", 8, 3, 40.0)])
    cal.observe([Timing("det", "d1", 1, 5, 4 * 100.0 + 2500.0, max_ms=2500.0),   # one stall inside a report
                 Timing("rec", "r1", 8, 6, 5 * 40.0 + 1800.0, max_ms=1800.0)])
    cal.observe([normal("det", "d1", 1, 6, 100.0), normal("rec", "r1", 8, 10, 40.0)])
    for _ in range(3):                                                       # trusted now; more stalls
        cal.observe([Timing("det", "d1", 1, 1, 1500.0, max_ms=1500.0), Timing("rec", "r1", 4, 1, 900.0, max_ms=900.0)])
        cal.observe([normal("det", "d1", 1, 5, 100.0), normal("rec", "r1", 8, 5, 40.0)])
    assert cal.host_factor() == pytest.approx(1.0, abs=0.05)
    f = cal.factors()
    assert f[("det", "d1")] == pytest.approx(1.0) and f[("rec", "r1")] == pytest.approx(1.0)
    assert cal.stalls() == {("det", "d1"): 5, ("rec", "r1"): 4}   # 1 + 1 + 3 and 1 + 3
    assert not cal.needs_replan()    # nothing moved: no re-plan (the GPU run swapped rec variants 3x in 20 s)


def test_a_host_that_really_slows_down_is_believed_after_min_batches():
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    cal.observe([normal("det", "d1", 1, 20, 100.0)])
    cal.calibrated()
    cal.observe([normal("det", "d1", 1, 6, 1000.0)])          # 10x: held back as stalls so far
    assert cal.factors()[("det", "d1")] == pytest.approx(1.0)
    cal.observe([normal("det", "d1", 1, 4, 1000.0)])          # 10 batches in a row that slow: the host
    assert cal.factors()[("det", "d1")] == pytest.approx(10.0) and cal.needs_replan()


def test_a_slow_tail_the_profile_expects_is_not_a_stall():
    """The threshold scales with the profile's p95 / p50: a heavy-tailed variant's slow
    batches are still speed."""
    heavy = parse_profile({"name": "h", "slo_ms": 1000, "tasks": [{"name": "t", "variants": [
        {"name": "v", "accuracy": 1.0, "latency_ms": {"1": {"p50_ms": 10, "p95_ms": 30}}}]}]})
    cal = LatencyCalibrator(heavy, min_batches=4)
    cal.observe([Timing("t", "v", 1, 4, 3 * 10.0 + 100.0, max_ms=100.0)])   # 10x: within 4 x 3 = 12x
    assert cal.factors()[("t", "v")] == pytest.approx(130.0 / 40.0)
    assert cal.stalls() == {}


def test_the_host_probe_times_warm_shapes_only():
    """pipeserve-calibrate's probe: each page (a new input shape) stalls on its first call;
    the probe's figure is the warm batch time, not the stall."""
    from services.tools.calibrate import warm_batch_ms

    class Clock:
        t = 0.0

        def __call__(self) -> float:
            return self.t

    class ShapeStalls:     # a processor whose first call per payload costs 2.9 s, later 10 ms
        def __init__(self, clock):
            self.clock, self.seen = clock, set()

        def prepare(self, payload):
            return payload

        def run_batch(self, session, items):
            for x in items:
                self.clock.t += 0.010 if x in self.seen else 2.9
                self.seen.add(x)
            return [None] * len(items)

    clock = Clock()
    pages = [b"p0", b"p1", b"p2", b"p3"]
    assert warm_batch_ms(ShapeStalls(clock), None, pages, repeats=5, min_s=0.0, clock=clock) == pytest.approx(10.0)

    class Shared(ShapeStalls):   # a host whose other work takes the core 3 calls in 4 after the first few
        calls = 0

        def run_batch(self, session, items):
            self.calls += 1
            self.clock.t += 0.010 if self.calls <= 8 or self.calls % 4 == 0 else 0.030
            return [None] * len(items)

    clock = Clock()
    ms = warm_batch_ms(Shared(clock), None, pages, repeats=5, min_s=1.0, clock=clock)
    assert ms == pytest.approx((10 + 3 * 30) / 4, rel=0.05)   # the share over 1 s, not the first 5 batches' 10 ms

    class Stalls(ShapeStalls):   # warm, but every 10th call stalls (a model reload, a shape the warm-up missed)
        calls = 0

        def run_batch(self, session, items):
            self.calls += 1
            self.clock.t += 2.9 if self.calls % 10 == 0 else 0.010
            return [None] * len(items)

    clock = Clock()
    assert warm_batch_ms(Stalls(clock), None, pages, repeats=5, min_s=1.0, clock=clock) == pytest.approx(10.0)


def test_the_controller_hands_the_calibration_each_reports_slowest_batch():
    """A heartbeat's ``max_ms`` reaches the calibrator, which leaves that stall out."""
    from pathlib import Path

    from ocr_like_profile import ocr_like_profile_dict  # tests/unit is on sys.path

    from services.common.spec import load_spec
    from services.controller.core import ControllerCore
    from services.controller.registry import WorkerRegistry
    from services.policy.planning import PlannerPolicy

    spec = load_spec(Path(__file__).resolve().parents[2] / "pipelines" / "ocr.yaml")
    profile = parse_profile(ocr_like_profile_dict(), source="test")
    pol = PlannerPolicy(profile, spec.slo_ms)

    async def publish(plan):
        return plan

    core = ControllerCore(spec, WorkerRegistry(), publish, planner=pol)
    v = profile.task("det").variants[0]
    ms = v.latency_ms[1].p50_ms
    core.observe_stats("det", {"timings": [{"task": "det", "variant": v.name, "batch_size": 1, "count": 12,
                                            "total_ms": 11 * ms + 2500.0, "max_ms": 2500.0}]})
    assert pol.calibrator.stalls() == {("det", v.name): 1}
    assert pol.calibrator.factors()[("det", v.name)] == pytest.approx(1.0)


def _shared(table):
    from dataclasses import replace
    return replace(PROFILE, device="cpu", sharing={"cpu": table})


def test_sharing_of_the_load_is_divided_out_of_the_factor():
    """Batches measured with 3 workers busy on a device whose table says 3 cost 1.8x: a
    host only as slow as that calibrates to 1.0, so the planner's 1.8 applies once."""
    cal = LatencyCalibrator(_shared({1: 1.0, 2: 1.2, 3: 1.8}), min_batches=10)
    cal.observe([Timing("det", "d1", 1, 10, 10 * 100.0 * 1.8, busy=3.0)])
    assert cal.factors()[("det", "d1")] == pytest.approx(1.0)
    cal.observe([Timing("rec", "r1", 8, 10, 10 * 40.0 * 1.2 * 2.0, busy=2.0)])   # 2x beyond the sharing
    assert cal.factors()[("rec", "r1")] == pytest.approx(2.0)


def test_reports_without_their_load_use_the_plans():
    cal = LatencyCalibrator(_shared({1: 1.0, 2: 1.5}), min_batches=10)
    cal.set_busy(2)
    cal.observe([Timing("det", "d1", 1, 10, 10 * 150.0)])
    assert cal.factors()[("det", "d1")] == pytest.approx(1.0)    # 150 / (100 x 1.5)
    with pytest.raises(ValueError, match="busy"):
        cal.set_busy(0)


def test_without_a_table_the_load_changes_nothing():
    cal = LatencyCalibrator(PROFILE, min_batches=10)
    cal.set_busy(3)
    cal.observe([Timing("det", "d1", 1, 10, 10 * 180.0, busy=3.0)])
    assert cal.factors()[("det", "d1")] == pytest.approx(1.8)
