import asyncio

import pytest

from services.common.errors import SpecError
from services.common.plan import (ANY_PATH, Plan, RegisteredWorker, WorkerAssignment, assign_workers,
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
