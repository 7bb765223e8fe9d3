"""The cluster at a glance, for the ``ClusterStatus`` RPC (``pipeserve status`` prints it).

:func:`cluster_status` is pure: it reads the controller's core (the plan in force, the
worker registry with each worker's last heartbeat, the demand estimate) and an
:class:`OutcomeWindow`, and returns a JSON-able dict. :func:`read_frontdoor_counts` is the
one piece of I/O: the front doors' outcome counters from Redis.

Recent outcomes: front doors and workers report *cumulative* counters (a front door's
``ok``, ``dropped``, ``shed`` ... in its Redis hash, a worker's ``dropped``, ``shed``,
``errors`` in its heartbeat). :class:`OutcomeWindow` keeps the increments it saw with
their times, so "over the last 60 s" is a sum of increments. A counter that goes down
means the process restarted: its counters' new values are the increments.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Iterable, Mapping

from services.common.plan_channel import frontdoor_pattern

DEFAULT_WINDOW_S = 60.0
KEEP_S = 600.0   # the longest window a caller may ask for

FRONTDOOR_COUNTERS = ("received", "ok", "dropped", "shed", "invalid", "not_found", "failed", "cancelled")
WORKER_COUNTERS = ("completed", "dropped", "shed", "errors")


class OutcomeWindow:
    """Increments of cumulative counters per source (``frontdoor:<id>``, ``worker:<id>``),
    kept for ``keep_s`` seconds. Time is passed in (monotonic seconds)."""

    def __init__(self, keep_s: float = KEEP_S) -> None:
        self.keep_s = keep_s
        self._last: dict[str, dict[str, int]] = {}
        self._events: deque[tuple[float, str, dict[str, int]]] = deque()
        self.started: float | None = None

    def observe(self, source: str, counters: Mapping[str, Any], now: float) -> None:
        if self.started is None:
            self.started = now
        values = {k: int(v) for k, v in counters.items()}
        last = self._last.get(source)
        self._last[source] = values
        if last is None:   # the first sight of a source: its history before is unknown
            return
        # a counter that went down: the process restarted, every counter starts from zero
        restarted = any(v < last.get(k, 0) for k, v in values.items())
        delta = {k: d for k, v in values.items() if (d := v if restarted else v - last.get(k, 0))}
        if delta:
            self._events.append((now, source, delta))
        while self._events and self._events[0][0] < now - self.keep_s:
            self._events.popleft()

    def recent(self, prefix: str, window_s: float, now: float) -> dict[str, int]:
        """The summed increments of the sources whose name starts with ``prefix``, over the
        last ``window_s`` seconds."""
        total: Counter = Counter()
        for t, source, delta in self._events:
            if t >= now - window_s and source.startswith(prefix):
                total.update(delta)
        return dict(total)

    def covered_s(self, window_s: float, now: float) -> float:
        """How much of the window the window actually saw (less right after a start)."""
        return 0.0 if self.started is None else min(window_s, now - self.started)


async def read_frontdoor_counts(client, pipeline: str) -> dict[str, dict[str, int]]:
    """Every front door's cumulative outcome counters, by router id."""
    out = {}
    prefix = frontdoor_pattern(pipeline)[:-1]
    async for key in client.scan_iter(match=frontdoor_pattern(pipeline), count=100):
        fields = await client.hgetall(key)
        name = key.decode()[len(prefix):]
        out[name] = {k.decode(): int(float(v)) for k, v in fields.items() if k.decode() in FRONTDOOR_COUNTERS}
    return out


def observe_workers(window: OutcomeWindow, records: Iterable, now: float) -> None:
    """Feed every registered worker's counters from its last heartbeat."""
    for r in records:
        if r.stats:
            window.observe(f"worker:{r.worker.worker_id}",
                           {k: r.stats.get(k, 0) for k in WORKER_COUNTERS}, now)


async def observe_outcomes(window: OutcomeWindow, client, pipeline: str, records: Iterable,
                           now: float) -> None:
    """One observation of every worker's and every front door's counters."""
    observe_workers(window, records, now)
    for name, counts in (await read_frontdoor_counts(client, pipeline)).items():
        window.observe(f"frontdoor:{name}", counts, now)


def plan_summary(plan, now_wall: float) -> dict | None:
    """What the plan runs: its allocations (task, variant, batch size, replicas, workers)
    and what it promises (capacity, expected accuracy, admission rate)."""
    if plan is None:
        return None
    groups: dict[tuple, list[str]] = {}
    for wid, w in sorted(plan.workers.items()):
        groups.setdefault((w.task, w.variant, w.batch_size), []).append(wid)
    return {
        "version": plan.version, "source": plan.source,
        "age_s": round(max(0.0, now_wall - plan.created_unix_s), 1),
        "expected_accuracy": plan.expected_accuracy, "capacity_qps": plan.capacity_qps,
        "admission_rate_qps": plan.admission_rate_qps,
        "allocations": [{"task": t, "variant": v, "batch_size": b, "replicas": len(ws), "workers": ws}
                        for (t, v, b), ws in groups.items()],
    }


def _workers(core, now: float) -> list[dict]:
    plan = core.current
    out = []
    for wid, r in sorted(core.registry.records.items()):
        s = r.stats
        planned = plan.workers.get(wid) if plan is not None else None
        out.append({
            "worker_id": wid, "task": r.worker.task or s.get("task") or "", "pool": not r.worker.task,
            "address": r.worker.address,
            "state": s.get("state") or "registered",   # no heartbeat yet: only registered
            "variant": s.get("variant") or "", "batch_size": int(s.get("batch_size") or 0),
            "plan_version": int(s.get("plan_version") or 0),
            "planned": None if planned is None else {"task": planned.task, "variant": planned.variant,
                                                      "batch_size": planned.batch_size},
            "queue_length": int(s.get("queue_length") or 0),
            **{k: int(s.get(k) or 0) for k in ("arrivals", *WORKER_COUNTERS)},
            "providers": list(r.providers),
            "last_seen_s": round(max(0.0, now - r.last_seen), 1),
        })
    registered = set(core.registry.records)
    for wid, w in sorted((plan.workers if plan is not None else {}).items()):
        if wid not in registered:   # in the plan in force but gone (lost, or not back yet)
            out.append({"worker_id": wid, "task": w.task, "pool": False, "address": w.address,
                        "state": "missing", "variant": "", "batch_size": 0, "plan_version": 0,
                        "planned": {"task": w.task, "variant": w.variant, "batch_size": w.batch_size},
                        "queue_length": 0, "arrivals": 0, **{k: 0 for k in WORKER_COUNTERS},
                        "providers": [], "last_seen_s": None})
    return out


def waiting_for(core) -> list[str]:
    """The spec's tasks no registered worker can serve (the controller publishes no plan
    until every task has one): none bound to them, and too few pool workers left."""
    bound = {r.worker.task for r in core.registry.records.values() if r.worker.task}
    pool = sum(1 for r in core.registry.records.values() if not r.worker.task)
    missing = [t.name for t in core.spec.tasks if t.name not in bound]
    return [] if len(missing) <= pool else missing


def cluster_status(core, window: OutcomeWindow, *, window_s: float = DEFAULT_WINDOW_S,
                   now: float | None = None, now_wall: float | None = None) -> dict:
    """The JSON-able status: see the module docstring and ``ClusterStatusResponse``."""
    now = time.monotonic() if now is None else now
    now_wall = time.time() if now_wall is None else now_wall
    window_s = min(max(window_s, 1.0), window.keep_s)
    planner = core.planner
    plan = core.current
    missing = waiting_for(core)
    if plan is None:
        why = (f"waiting for a worker of task {', '.join(missing)}" if missing
               else "no plan published yet")
    else:
        why = ""
    target = planner.target_demand(core.demand_qps) if planner is not None else None
    frontdoor = window.recent("frontdoor:", window_s, now)
    covered = window.covered_s(window_s, now)
    return {
        "pipeline": core.spec.name,
        "tasks": [t.name for t in core.spec.tasks],
        "slo_ms": core.spec.slo_ms,
        "mode": "planner" if planner is not None else "operator",
        "profile": planner.profile.source if planner is not None else None,
        "plan": plan_summary(plan, now_wall),
        "no_plan_reason": why,
        "waiting_for_tasks": missing,
        "workers": _workers(core, now),
        "demand": {
            "estimate_qps": round(core.demand_qps, 3) if planner is not None else None,
            "estimate_ready": bool(core.demand_ready) if planner is not None else None,
            "planned_for_qps": round(target, 3) if target is not None else None,
            # requests the front doors received over the recent window, per second
            "measured_qps": (round(frontdoor.get("received", 0) / covered, 3) if covered >= 1.0 else None),
            "capacity_qps": plan.capacity_qps if plan is not None else None,
            "admission_rate_qps": plan.admission_rate_qps if plan is not None else None,
        },
        "recent": {
            "window_s": window_s,
            "covered_s": round(covered, 1),
            "frontdoor": {k: frontdoor.get(k, 0) for k in FRONTDOOR_COUNTERS},
            "workers": {k: v for k, v in sorted(window.recent("worker:", window_s, now).items())},
        },
        "calibration": core.calibration_status(),
    }
