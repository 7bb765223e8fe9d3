import asyncio
import json

import pytest

from services.common.errors import SpecError
from services.common.plan import (ANY_PATH, Allocation, Plan, RegisteredWorker, WorkerAssignment, assign_workers,
                                  parse_plan_file, uniform_routing, validate_plan)
from services.common.plan_channel import PlanSubscriber
from services.common.spec import parse_spec

SPEC = parse_spec({
    "name": "ocr", "slo_ms": 1000,
    "tasks": [
        {"name": "det", "children": ["rec"], "variants": [
            {"name": "d1", "model": "d", "processor": "k"}, {"name": "d2", "model": "d", "processor": "k"}]},
        {"name": "rec", "variants": [
            {"name": "r1", "model": "r", "processor": "k"}, {"name": "r2", "model": "r", "processor": "k"}]},
    ],
})

FILE = """
pipeline: ocr
allocations:
  - {task: det, variant: d1, batch_size: 2, replicas: 1}
  - {task: rec, variant: r1, batch_size: 8, replicas: 2}
"""

WORKERS = [RegisteredWorker("det-0", "h:1", "det"), RegisteredWorker("rec-0", "h:2", "rec"),
           RegisteredWorker("rec-1", "h:3", "rec"), RegisteredWorker("rec-2", "h:4", "rec")]


def make_plan(version=1, allocations=FILE, current=None):
    allocs = parse_plan_file(allocations, SPEC)
    assignments = assign_workers(allocs, WORKERS, current)
    return Plan(version, "ocr", assignments, uniform_routing(assignments, allocs))


def test_plan_round_trips_through_json_and_validates():
    plan = make_plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    validate_plan(again, SPEC)
    assert set(plan.workers) == {"det-0", "rec-0", "rec-1"}   # rec-2 is surplus: idle
    assert plan.weights_for("rec", "d1") == {"rec-0": 0.5, "rec-1": 0.5}   # via the "*" entry
    assert plan.weights_for("det", "") == {"det-0": 1.0}


def test_newer_versions_only():
    a, b = make_plan(3), make_plan(4)
    assert b.is_newer_than(a) and not a.is_newer_than(b) and not a.is_newer_than(a)
    assert a.is_newer_than(None)


def test_assignment_moves_as_few_workers_as_possible():
    current = make_plan()
    # the operator swaps one rec replica to r2: exactly one worker changes
    new_file = FILE.replace("{task: rec, variant: r1, batch_size: 8, replicas: 2}",
                            "{task: rec, variant: r1, batch_size: 8, replicas: 1}\n"
                            "  - {task: rec, variant: r2, batch_size: 8, replicas: 1}")
    nxt = make_plan(2, new_file, current)
    changed = [w for w in nxt.workers if current.workers.get(w) != nxt.workers[w]]
    assert len(changed) == 1
    assert sorted(w.variant for w in nxt.workers_of("rec")) == ["r1", "r2"]


def test_batch_size_change_keeps_the_variant_on_the_same_worker():
    current = make_plan()
    nxt = make_plan(2, FILE.replace("batch_size: 8", "batch_size: 4"), current)
    for wid in ("rec-0", "rec-1"):
        assert nxt.workers[wid].variant == current.workers[wid].variant == "r1"
        assert nxt.workers[wid].batch_size == 4


def test_shares_split_traffic_between_variants():
    allocs = parse_plan_file(FILE.replace("replicas: 2}", "replicas: 1, share: 0.75}") +
                             "  - {task: rec, variant: r2, batch_size: 8, replicas: 1, share: 0.25}\n", SPEC)
    assignments = assign_workers(allocs, WORKERS, None)
    routing = uniform_routing(assignments, allocs)
    by_variant = {}
    for wid, w in routing["rec"][ANY_PATH].items():
        by_variant[assignments[wid].variant] = by_variant.get(assignments[wid].variant, 0) + w
    assert by_variant == pytest.approx({"r1": 0.75, "r2": 0.25})


@pytest.mark.parametrize("text, field", [
    ("pipeline: other\nallocations: []", "pipeline"),
    ("pipeline: ocr\nallocations: []", "allocations"),
    ("pipeline: ocr\nallocations:\n  - {task: nope, variant: d1}", "allocations[0].task"),
    ("pipeline: ocr\nallocations:\n  - {task: det, variant: r1}", "allocations[0].variant"),
    ("pipeline: ocr\nallocations:\n  - {task: det, variant: d1, batch_size: 0}", "allocations[0].batch_size"),
    ("pipeline: ocr\nallocations:\n  - {task: det, variant: d1}", "allocations"),   # no rec
])
def test_bad_plan_files_name_the_field(text, field):
    with pytest.raises(SpecError) as err:
        parse_plan_file(text, SPEC)
    assert err.value.field == field


def test_validate_rejects_plans_that_do_not_fit_the_spec():
    plan = make_plan()
    bad = Plan(2, "ocr", {**plan.workers, "rec-0": WorkerAssignment("rec-0", "h:2", "rec", "d1", 8)},
               plan.routing)
    with pytest.raises(SpecError, match="rec-0"):
        validate_plan(bad, SPEC)
    weights = {"det": {ANY_PATH: {"det-0": 0.5}}, "rec": plan.routing["rec"]}
    with pytest.raises(SpecError, match="sum to 1"):
        validate_plan(Plan(3, "ocr", plan.workers, weights), SPEC)


def test_subscriber_applies_only_newer_valid_plans():
    asyncio.run(_subscriber_scenario())


async def _subscriber_scenario():
    seen = []
    sub = PlanSubscriber("redis://unused", "ocr", seen.append, validate=lambda p: validate_plan(p, SPEC))
    await sub._apply_raw(make_plan(2).to_json().encode())
    await sub._apply_raw(make_plan(1).to_json().encode())          # older: ignored
    await sub._apply_raw(make_plan(2).to_json().encode())          # same: ignored
    invalid = make_plan(3)
    invalid = Plan(3, "ocr", invalid.workers, {"det": invalid.routing["det"]})   # no rec routing
    await sub._apply_raw(invalid.to_json().encode())               # invalid: kept v2
    await sub._apply_raw(b"{not json")                             # garbage: kept v2
    assert [p.version for p in seen] == [2] and sub.current.version == 2
    await sub._apply_raw(make_plan(4).to_json().encode())
    assert [p.version for p in seen] == [2, 4]


def _plan_dict(**change):
    d = json.loads(make_plan(5).to_json())
    for path, value in change.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return d


@pytest.mark.parametrize("change, field", [
    ({"workers__det-0__batch_size": "2"}, "workers.det-0.batch_size"),   # the example
    ({"workers__det-0__batch_size": 0}, "workers.det-0.batch_size"),
    ({"workers__det-0__batch_size": True}, "workers.det-0.batch_size"),
    ({"version": "5"}, "version"),
    ({"routing__det__*__det-0": "1"}, "routing.det.*.det-0"),
    ({"routing__det__*__det-0": float("nan")}, "routing.det.*.det-0"),
    ({"admission_rate_qps": "fast"}, "admission_rate_qps"),
    ({"workers__det-0": ["not", "a", "mapping"]}, "workers.det-0"),
    ({"routing": []}, "routing"),
    ({"latency_ms": {"det": {"d1": {"one": 3.0}}}}, "latency_ms.det.d1"),
])
def test_malformed_plans_are_refused_with_the_field_named(change, field):
    with pytest.raises(SpecError) as err:
        Plan.from_dict(_plan_dict(**change), source="redis")
    assert err.value.field == field


def test_a_malformed_plan_in_the_channel_is_skipped_and_the_last_good_one_stays():
    """Regression: ``"batch_size": "2"`` used to raise a TypeError inside validation that
    killed the subscriber task in every router and worker."""
    async def scenario():
        seen = []
        sub = PlanSubscriber("redis://unused", "ocr", seen.append, validate=lambda p: validate_plan(p, SPEC))
        await sub._apply_raw(make_plan(2).to_json().encode())
        bad = _plan_dict(**{"workers__det-0__batch_size": "2"})
        bad["version"] = 3
        await sub._apply_raw(json.dumps(bad).encode())        # logged and skipped, no exception
        await sub._apply_raw(json.dumps([1, 2, 3]).encode())  # not even a mapping
        assert sub.current.version == 2
        await sub._apply_raw(make_plan(4).to_json().encode())
        return seen, sub

    seen, sub = asyncio.run(scenario())
    assert [p.version for p in seen] == [2, 4]


def test_a_failing_plan_callback_does_not_stop_later_plans():
    calls = []

    def on_plan(p):
        calls.append(p.version)
        if p.version == 2:
            raise RuntimeError("bug in a callback")

    async def scenario():
        sub = PlanSubscriber("redis://unused", "ocr", on_plan)
        await sub._apply_raw(make_plan(2).to_json().encode())
        await sub._apply_raw(make_plan(3).to_json().encode())
        return sub

    sub = asyncio.run(scenario())
    assert calls == [2, 3] and sub.current.version == 3


def test_share_zero_on_every_variant_of_a_task_is_a_clear_error():
    """Regression: this crashed the operator path with a ZeroDivisionError."""
    text = ("pipeline: ocr\nallocations:\n"
            "  - {task: det, variant: d1, batch_size: 1, replicas: 1, share: 0}\n"
            "  - {task: rec, variant: r1, batch_size: 4, replicas: 1}\n")
    with pytest.raises(SpecError, match="share 0"):
        parse_plan_file(text, SPEC)


def test_operator_routing_survives_when_only_share_zero_variants_have_workers():
    allocs = [Allocation("det", "d1", 1, 1, share=0.0), Allocation("det", "d2", 1, 1, share=1.0),
              Allocation("rec", "r1", 4, 1)]
    workers = [RegisteredWorker("det-0", "h:1", "det"), RegisteredWorker("rec-0", "h:2", "rec")]
    assigned = assign_workers(allocs, workers, None)       # d2's worker is not there
    routing = uniform_routing(assigned, allocs)
    assert routing["det"][ANY_PATH] == {"det-0": 1.0}


def _plan_of(workers: dict[str, tuple[str, str]]) -> Plan:
    return Plan(version=1, pipeline="ocr", routing={}, workers={
        w: WorkerAssignment(w, f"h:{w}", task, variant, 4) for w, (task, variant) in workers.items()})


def test_a_pool_move_takes_the_worker_that_took_its_task_last():
    """Two rec workers (one just moved there, maybe still loading; one serving it for long),
    and the plan now wants one rec and two det: the newcomer goes to det, the long-serving
    rec worker stays (by worker id alone, pool-0 would stay and pool-2 would move)."""
    from services.common.plan import bind_pool
    pool = [RegisteredWorker(f"pool-{i}", f"h:{i}", "") for i in range(3)]
    current = _plan_of({"pool-0": ("rec", "r1"), "pool-1": ("det", "d1"), "pool-2": ("rec", "r1")})
    allocs = [Allocation("det", "d1", 4, 2), Allocation("rec", "r2", 4, 1)]
    bound = {w.worker_id: w.task for w in bind_pool(allocs, pool, current, ["det", "rec"],
                                                     since={"pool-0": 43.2, "pool-1": 0.0, "pool-2": 0.0})}
    assert bound == {"pool-0": "det", "pool-1": "det", "pool-2": "rec"}
    by_id = {w.worker_id: w.task for w in bind_pool(allocs, pool, current, ["det", "rec"])}
    assert by_id == {"pool-0": "rec", "pool-1": "det", "pool-2": "det"}   # without ``since``: worker order


def test_the_planner_remembers_when_each_worker_took_its_task():
    from services.planner import load_profile
    from services.policy.planning import PlannerPolicy
    profile = load_profile("profiles/ocr_cpu.json")
    pool = [RegisteredWorker(f"pool-{i}", f"h:{i}", "") for i in range(3)]
    pol = PlannerPolicy(profile, 1500.0, verbose=False)
    first = pol.decide(pool, 0.5, None, now=10.0)
    assert {w: t for w, (_, t) in pol.task_since.items()} == {w: 10.0 for w in first.workers}
    again = pol.decide(pool, 0.6, first, now=20.0)
    kept = [w for w in again.workers if w in first.workers and again.workers[w].task == first.workers[w].task]
    assert kept and all(pol.task_since[w][1] == 10.0 for w in kept)           # same task: since 10 s
    assert all(pol.task_since[w][1] == 20.0 for w in again.workers if w not in kept)


def test_standby_round_trips_and_is_checked():
    """A plan's standby models (for parked workers) survive JSON, and a malformed or
    unknown one, or one naming a worker the plan runs, is refused with its field named."""
    from services.common.errors import SpecError
    from services.common.plan import Plan, validate_plan
    from services.common.spec import load_spec
    import json
    import pytest
    spec = load_spec("pipelines/echo.yaml")
    task = spec.tasks[0]
    variant = task.variants[0].name
    ids = {t.name: ("w1" if t is task else f"w-{t.name}") for t in spec.tasks}
    base = {"version": 3, "pipeline": spec.name,
            "workers": {ids[t.name]: {"worker_id": ids[t.name], "address": "a:1", "task": t.name,
                                      "variant": t.variants[0].name, "batch_size": 1} for t in spec.tasks},
            "routing": {t.name: {"*": {ids[t.name]: 1.0}} for t in spec.tasks}}
    validate_plan(Plan.from_dict({**base, "standby": {"w2": f"{task.name}/{variant}"}}), spec)
    plan = Plan.from_dict({**base, "standby": {"w2": f"{task.name}/{variant}"}})
    assert Plan.from_json(plan.to_json()).standby == {"w2": f"{task.name}/{variant}"}
    with pytest.raises(SpecError, match="standby.w2"):
        Plan.from_dict({**base, "standby": {"w2": "no-slash"}})
    with pytest.raises(SpecError, match="standby.w1"):
        validate_plan(Plan.from_dict({**base, "standby": {"w1": f"{task.name}/{variant}"}}), spec)
    with pytest.raises(SpecError, match="standby.w2"):
        validate_plan(Plan.from_dict({**base, "standby": {"w2": f"{task.name}/nope"}}), spec)
    assert json.loads(plan.to_json())["standby"] == {"w2": f"{task.name}/{variant}"}
