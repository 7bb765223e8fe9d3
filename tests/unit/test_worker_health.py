"""Worker health policy (services/policy/health.py) on a fake clock: circuit breakers,
suspect workers, the choice of another replica, and the stuck-batch rule."""
import pytest

from services.policy.health import (BreakerState, Candidate, HealthConfig, WorkerHealth, alternative,
                                    batch_stuck)

CFG = HealthConfig(failures_to_open=2, cooldown_s=1.0, max_cooldown_s=3.0, margin_s=0.25, margin_factor=2.0,
                   suspect_after=0.5)


def fail(h, wid, now, expected=0.01):
    return h.call_ended(h.call_started(wid, now, expected), now, failed=True)


def succeed(h, wid, now, expected=0.01):
    return h.call_ended(h.call_started(wid, now, expected), now, failed=False)


def test_consecutive_failures_open_the_breaker_and_a_success_in_between_resets_them():
    h = WorkerHealth(CFG)
    assert fail(h, "w", 0.0) is None and h.usable("w", 0.0)          # 1 of 2
    assert succeed(h, "w", 0.1) is None                               # reset
    assert fail(h, "w", 0.2) is None and h.usable("w", 0.2)
    assert fail(h, "w", 0.3) is BreakerState.OPEN
    assert not h.usable("w", 0.3) and h.state("w", 0.3) is BreakerState.OPEN


def test_open_half_open_probe_and_the_cool_down_doubling_up_to_its_cap():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    fail(h, "w", 0.0)                                                 # open at t=0
    assert not h.usable("w", 0.99)
    assert h.state("w", 1.0) is BreakerState.HALF_OPEN and h.usable("w", 1.0)
    probe = h.call_started("w", 1.0, 0.01)                            # the first call is the probe
    other = h.call_started("x", 1.0, 0.01)
    assert not h.usable("w", 1.0)                                     # one probe at a time
    assert h.call_ended(probe, 1.2, failed=True) is BreakerState.OPEN  # cool-down now 2 s
    h.call_ended(other, 1.2, failed=False)
    assert not h.usable("w", 3.1) and h.usable("w", 3.2)              # 1.2 + 2
    probe = h.call_started("w", 3.2, 0.01)
    h.call_ended(probe, 3.3, failed=True)                             # cool-down min(4, 3) = 3 s
    assert not h.usable("w", 6.2) and h.usable("w", 6.3)
    probe = h.call_started("w", 6.3, 0.01)
    assert h.call_ended(probe, 6.4, failed=False) is BreakerState.CLOSED
    fail(h, "w", 6.5)
    fail(h, "w", 6.5)                                                 # open again: cool-down back to 1 s
    assert h.usable("w", 7.5)


def test_a_cancelled_call_is_forgotten_without_an_outcome():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    t = h.call_started("w", 0.0, 0.01)
    assert h.call_ended(t, 0.1, failed=None) is None
    assert fail(h, "w", 0.2) is BreakerState.OPEN                     # the count went on from 1


def test_a_worker_with_a_call_well_past_its_expected_end_is_suspect():
    h = WorkerHealth(CFG)
    t = h.call_started("w", 10.0, 0.1)   # margin max(0.25, 2 x 0.1) = 0.25; suspect at 10.1 + 0.5 x 0.25
    assert h.margin_s(0.1) == pytest.approx(0.25) and h.margin_s(0.5) == pytest.approx(1.0)
    assert h.usable("w", 10.2) and not h.suspect("w", 10.2)
    assert h.suspect("w", 10.23) and not h.usable("w", 10.23)
    assert h.state("w", 10.23) is BreakerState.CLOSED                 # suspect is not a failure
    h.call_ended(t, 10.3, failed=True)
    assert not h.suspect("w", 10.3) and h.usable("w", 10.3)


def test_forget_drops_workers_that_left_the_plan_and_their_calls():
    h = WorkerHealth(CFG)
    fail(h, "w", 0.0)
    fail(h, "w", 0.0)
    t = h.call_started("v", 0.0, 0.01)
    h.forget({"x"})
    assert h.usable("w", 0.0) and h.usable("v", 5.0)
    assert h.call_ended(t, 5.0, failed=True) is None
    assert h.snapshot(5.0) == {}


def test_another_replica_same_variant_first_then_another_variant_none_when_none_is_usable():
    cands = [Candidate("b", "v2", 1.0), Candidate("c", "v1", 0.0), Candidate("d", "v1", 0.0)]
    draws = []

    def u():
        draws.append(1)
        return 0.5

    assert alternative("v1", cands, lambda w: True, u) == "c"          # same variant, first listed
    assert alternative("v1", cands, lambda w: w != "c", u) == "d"
    assert draws == []                                                 # no weights: nothing drawn
    assert alternative("v1", cands, lambda w: w == "b", u) == "b"      # only another variant is left
    assert draws == [1]
    assert alternative("v1", cands, lambda w: False, u) is None
    weighted = [Candidate("c", "v1", 0.25), Candidate("d", "v1", 0.75)]
    assert alternative("v1", weighted, lambda w: True, lambda: 0.2) == "c"   # 0.2 x 1.0 < 0.25
    assert alternative("v1", weighted, lambda w: True, lambda: 0.3) == "d"


def test_a_batch_is_stuck_past_ten_times_its_expected_time_and_at_least_two_seconds():
    assert not batch_stuck(1.9, 0.01)          # under the 2 s floor
    assert batch_stuck(2.1, 0.01)              # max(10 x 0.01, 2) = 2
    assert not batch_stuck(4.9, 0.5)           # max(10 x 0.5, 2) = 5
    assert batch_stuck(5.1, 0.5)
    assert not batch_stuck(0.0, 0.0)


# -- the controller: a worker whose batch is stuck while its heartbeats go on ----------

def test_a_worker_stuck_in_a_batch_leaves_the_plan_and_rejoins_when_the_batch_ends():
    """rec-1 heartbeats on time but its batch has run 3 s against 10 ms expected
    (max(10 x 0.01, 2) = 2 s): the next control step plans without it, as for a lost
    worker, and logs it. When a heartbeat shows the batch over, the registry forgets it
    (the worker re-registers at once) and the plan takes it back."""
    import asyncio

    from structlog.testing import capture_logs

    from services.common.spec import parse_spec
    from services.controller.core import ControllerCore
    from services.controller.registry import WorkerRegistry

    spec = parse_spec({"name": "ocr", "slo_ms": 1000, "tasks": [
        {"name": "det", "children": ["rec"], "variants": [{"name": "d1", "model": "d", "processor": "k"}]},
        {"name": "rec", "variants": [{"name": "r1", "model": "r", "processor": "k"}]}]})
    now = [0.0]
    published = []

    async def publish(plan):
        published.append(plan.with_version(len(published) + 1))
        return published[-1]

    core = ControllerCore(spec, WorkerRegistry(timeout_s=5.0, clock=lambda: now[0]), publish)
    core.set_plan_text("pipeline: ocr\nallocations:\n"
                       "  - {task: det, variant: d1, batch_size: 1, replicas: 1}\n"
                       "  - {task: rec, variant: r1, batch_size: 8, replicas: 2}\n")
    reg = core.registry
    for wid, task in (("det-0", "det"), ("rec-0", "rec"), ("rec-1", "rec")):
        reg.register(wid, f"h:{wid}", task, [])
    asyncio.run(core.reconcile())
    assert set(published[-1].workers) == {"det-0", "rec-0", "rec-1"}

    now[0] = 1.0
    assert reg.heartbeat("rec-1", {"batch_running_s": 1.5, "batch_expected_s": 0.01})   # slow, not stuck
    assert asyncio.run(core.reconcile()).lost == []
    now[0] = 2.5
    with capture_logs() as logs:
        assert reg.heartbeat("rec-1", {"batch_running_s": 3.0, "batch_expected_s": 0.01})
        result = asyncio.run(core.reconcile())
    assert result.lost == ["rec-1"]
    assert any(e["event"] == "worker_stuck" and e["worker_id"] == "rec-1" for e in logs)
    assert set(published[-1].workers) == {"det-0", "rec-0"}
    assert [w.worker_id for w in reg.live()] == ["det-0", "rec-0"] and "rec-1" in reg.records
    now[0] = 4.0
    assert reg.heartbeat("rec-1", {"batch_running_s": 4.5, "batch_expected_s": 0.01})   # still stuck
    assert asyncio.run(core.reconcile()).lost == [] and len(published) == 2            # said once

    now[0] = 5.0
    assert not reg.heartbeat("rec-1", {"batch_running_s": 0.0, "batch_expected_s": 0.0})   # unknown now
    assert reg.register("rec-1", "h:rec-1", "rec", [])       # what the worker does next (membership change)
    core.dirty = True                                         # as ControllerServicer.RegisterWorker does
    asyncio.run(core.reconcile())
    assert set(published[-1].workers) == {"det-0", "rec-0", "rec-1"}


def test_the_worker_reports_how_long_its_running_batch_has_run_against_its_expected_time():
    """A model call that does not return (held on an event here): the worker's stats, which
    its heartbeats carry, show the batch's running time growing past its expected time;
    0 and 0 once no batch runs."""
    import asyncio
    import threading
    import time

    from services.common.processing import ItemResult, Prepared, Processor
    from services.common.spec import parse_spec
    from services.worker.core import ModelHost, WorkerCore

    spec = parse_spec({"name": "p", "slo_ms": 1000, "tasks": [{"name": "t", "variants": [
        {"name": "v1", "model": "m", "processor": "fake"}]}]})
    release = threading.Event()

    class Stuck(Processor):
        def prepare(self, payload):
            return Prepared(payload)

        def run_batch(self, session, items):
            release.wait(30)
            return [ItemResult(regions=(), child_payloads=()) for _ in items]

    def loader(variant):
        return ModelHost(variant, Stuck(variant, "."), session=None, providers=["FakeProvider"])

    async def scenario():
        core = WorkerCore("w", spec.task("t"), ".", loader=loader)
        core.start()
        await core.apply("v1", 1, plan_version=1, latency_ms={1: 5.0})
        idle = core.stats()
        answer = asyncio.create_task(core.submit([("q", b"x")], time.time() + 30))
        while core.stats()["batch_running_s"] < 0.2:
            await asyncio.sleep(0.02)
        stuck = core.stats()
        release.set()
        await answer
        after = core.stats()
        await core.stop()
        return idle, stuck, after

    idle, stuck, after = asyncio.run(scenario())
    assert (idle["batch_running_s"], idle["batch_expected_s"]) == (0.0, 0.0)
    assert stuck["batch_running_s"] >= 0.2 and stuck["batch_expected_s"] > 0.0
    assert (after["batch_running_s"], after["batch_expected_s"]) == (0.0, 0.0)
