"""From a PlanSolution to a publishable Plan: worker ids, routing tables, admission.

Routing: ``routing[task][upstream_path][worker_id]``; for every upstream variant path
the weights are the planned query rates of that path into each (variant, batch)
bucket, split evenly over the bucket's workers. Each task also gets an ``ANY_PATH``
entry (all paths together) for queries whose path the plan did not foresee (e.g. a
late query rerouted to a faster variant). Worker moves are minimised by
``services.common.plan.assign_workers``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

from services.common.plan import ANY_PATH, Plan, RegisteredWorker, assign_workers, bind_pool
from services.planner.profile import PipelineProfile
from services.planner.solver import PlanSolution


def latency_table(profile: PipelineProfile, assignments,
                  factors: Mapping[str, float] | None = None) -> dict[str, dict[str, dict[int, float]]]:
    """p50 batch latencies (ms) of the variants the assignments run, per task and variant;
    ``factors[variant]`` multiplies them (the sharing the plan was solved for)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for a in assignments:
        v = profile.task(a.task).variant(a.variant)
        f = (factors or {}).get(a.variant, 1.0)
        out.setdefault(a.task, {})[a.variant] = {b: p.p50_ms * f for b, p in sorted(v.latency_ms.items())}
    return out


def bucket_rates(solution: PlanSolution) -> dict[str, dict[str, dict[tuple[str, int], float]]]:
    """task -> upstream path -> (variant, batch) -> query rate."""
    out: dict[str, dict[str, dict[tuple[str, int], float]]] = defaultdict(lambda: defaultdict(dict))
    chains = sorted({f.tasks for f in solution.flows})
    ref: dict[str, tuple[str, ...]] = {}
    for ch in chains:
        for t in ch:
            ref.setdefault(t, ch)   # branches agree on shared prefixes: count each task once
    for f in solution.flows:
        for i, t in enumerate(f.tasks):
            if ref[t] != f.tasks:
                continue
            path = "/".join(f.variants[:i])
            key = (f.variants[i], f.batches[i])
            q = f.rate_qps * (f.mult[i] if f.mult else 1.0)
            out[t][path][key] = out[t][path].get(key, 0.0) + q
    return out


def _weights(rates: dict[tuple[str, int], float], members: dict[tuple[str, int], list[str]]) -> dict[str, float]:
    w: dict[str, float] = {}
    for key, q in rates.items():
        ids = members.get(key, [])
        for wid in ids:
            w[wid] = w.get(wid, 0.0) + q / len(ids)
    total = sum(w.values())
    return {k: x / total for k, x in sorted(w.items())} if total > 0 else {}


def plan_from_solution(solution: PlanSolution, workers: list[RegisteredWorker], previous: Plan | None,
                       version: int, now: float | None = None, profile: PipelineProfile | None = None,
                       since: Mapping[str, float] | None = None) -> Plan | None:
    """Turn a solution into plan ``version``. A failed solution keeps ``previous``
    (returned unchanged, possibly None). Pool workers (no task) are bound to tasks by
    :func:`bind_pool` (``since``: when each took its task); with ``profile`` the plan carries the latency figures of the
    variants it runs (``Plan.latency_ms``)."""
    if not solution.ok:
        return previous
    order = [t.name for t in profile.tasks] if profile is not None else \
        list(dict.fromkeys(a.task for a in solution.allocations))
    workers = bind_pool(list(solution.allocations), workers, previous, order, since)
    assignments = assign_workers(list(solution.allocations), workers, previous)
    members: dict[str, dict[tuple[str, int], list[str]]] = defaultdict(lambda: defaultdict(list))
    for a in sorted(assignments.values(), key=lambda a: a.worker_id):
        members[a.task][(a.variant, a.batch_size)].append(a.worker_id)
    routing: dict[str, dict[str, dict[str, float]]] = {}
    rates = bucket_rates(solution)
    for task, ms in members.items():
        table: dict[str, dict[str, float]] = {}
        total: dict[tuple[str, int], float] = defaultdict(float)
        for path, per_bucket in sorted(rates.get(task, {}).items()):
            w = _weights(per_bucket, ms)
            if w:
                table[path] = w
            for k, q in per_bucket.items():
                total[k] += q
        anyw = _weights(dict(total), ms)
        if not anyw:   # no planned traffic (zero demand): spread evenly
            ids = sorted(wid for ids in ms.values() for wid in ids)
            anyw = {wid: 1.0 / len(ids) for wid in ids}
        table[ANY_PATH] = anyw
        routing[task] = table
    kwargs = {} if now is None else {"created_unix_s": float(now)}
    planned = {task: {path: sum(b.values()) for path, b in paths.items()} for task, paths in rates.items()}
    for task, paths in planned.items():
        paths[ANY_PATH] = sum(paths.values())
    accuracy = dict(solution.variant_accuracy)
    worker_accuracy = {wid: accuracy[a.variant] for wid, a in assignments.items() if a.variant in accuracy}
    latency = latency_table(profile, assignments.values(), solution.latency_factors) if profile is not None else {}
    return Plan(version=version, pipeline=solution.pipeline, planned_qps=planned, worker_accuracy=worker_accuracy,
                latency_ms=latency,
                workers={k: v for k, v in sorted(assignments.items())}, routing=routing,
                admission_rate_qps=solution.admission_rate_qps, expected_accuracy=solution.expected_accuracy,
                capacity_qps=solution.capacity_qps, source=f"planner:{solution.method}:{solution.mode}", **kwargs)

