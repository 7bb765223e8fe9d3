"""The versioned plan: which worker runs which variant at which batch size, and how
each stage's router splits traffic.

A plan is an immutable value. Versions increase monotonically; subscribers apply a
plan only if ``plan.version`` is newer than the one they run (see ``plan_channel``).

Routing: ``routing[task][upstream_path][worker_id] = weight``. ``upstream_path`` is the
"/"-joined variant names of the ancestors that processed the query ("" for the root
task); the key ``"*"`` matches any upstream path. Weights of one entry sum to 1.

Planner-made plans also carry what MostAccurateFirst routing needs
(``services/policy/routing.py``): ``planned_qps[task][upstream_path]`` (the query rate
the plan was made for) and ``worker_accuracy[worker_id]`` (its variant's accuracy).
Without them (operator plans) routers follow the weights as they are.
"""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from services.common.errors import SpecError
from services.common.spec import PipelineSpec

ANY_PATH = "*"


@dataclass(frozen=True)
class WorkerAssignment:
    worker_id: str
    address: str
    task: str
    variant: str
    batch_size: int


@dataclass(frozen=True)
class Plan:
    version: int
    pipeline: str
    workers: Mapping[str, WorkerAssignment]
    routing: Mapping[str, Mapping[str, Mapping[str, float]]]
    admission_rate_qps: float | None = None   # None: admit everything
    expected_accuracy: float | None = None
    capacity_qps: float | None = None
    source: str = "operator"
    created_unix_s: float = field(default_factory=time.time)
    planned_qps: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    worker_accuracy: Mapping[str, float] = field(default_factory=dict)
    # p50 batch latency (ms) per task, variant and batch size, for the variants the plan
    # runs: seeds the workers' batch-time estimates and the downstream reserve
    latency_ms: Mapping[str, Mapping[str, Mapping[int, float]]] = field(default_factory=dict)
    # "task/variant" -> measured / profile latency factor the plan was made with
    calibration: Mapping[str, float] = field(default_factory=dict)
    # the demand (req/s, headroom included) the planner solved for; None: not planner-made
    planned_for_qps: float | None = None
    # task -> the variant a worker of that task keeps loaded beside its planned one and runs
    # a batch on when its queue says the plan is overrun (services.policy.batching.overrun);
    # its batch latencies are in ``latency_ms``. Empty: no spilling.
    burst: Mapping[str, str] = field(default_factory=dict)
    # worker_id -> "task/variant" for workers the plan parks (registered, not in
    # ``workers``): the model a parked worker loads and keeps ready, so that the plan that
    # brings it back at the next step (where the pool runs at full capacity) costs no
    # model load. Empty: parked workers hold nothing.
    standby: Mapping[str, str] = field(default_factory=dict)

    def is_newer_than(self, other: "Plan | None") -> bool:
        return other is None or self.version > other.version

    def with_version(self, version: int) -> "Plan":
        return replace(self, version=version, created_unix_s=time.time())

    def workers_of(self, task: str) -> list[WorkerAssignment]:
        return [w for w in self.workers.values() if w.task == task]

    def weights_for(self, task: str, upstream_path: str) -> Mapping[str, float]:
        """Routing weights for one stage, for queries that came along ``upstream_path``."""
        table = self.routing.get(task, {})
        if upstream_path in table:
            return table[upstream_path]
        return table.get(ANY_PATH, {})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workers"] = {k: asdict(v) for k, v in self.workers.items()}
        d["routing"] = {t: {p: dict(w) for p, w in tbl.items()} for t, tbl in self.routing.items()}
        d["planned_qps"] = {t: dict(p) for t, p in self.planned_qps.items()}
        d["worker_accuracy"] = dict(self.worker_accuracy)
        d["calibration"] = dict(self.calibration)
        d["burst"] = dict(self.burst)
        d["standby"] = dict(self.standby)
        d["latency_ms"] = {t: {v: {str(b): x for b, x in sorted(bs.items())} for v, bs in vs.items()}
                           for t, vs in self.latency_ms.items()}
        return d

    def fastest_s(self) -> dict[str, float]:
        """Each task's fastest single-query latency (s) among the variants the plan runs
        for it, from ``latency_ms`` (tasks without figures are left out)."""
        out: dict[str, float] = {}
        for w in self.workers.values():
            by_batch = self.latency_ms.get(w.task, {}).get(w.variant)
            if by_batch:
                x = by_batch[min(by_batch)] / 1000.0
                out[w.task] = min(out.get(w.task, x), x)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping[str, Any], source: str = "plan") -> "Plan":
        """Parse a plan, checking every field's type (a plan comes over the network:
        ``"batch_size": "2"`` is refused here, with the field named, not later in a
        comparison deep inside a subscriber)."""
        if not isinstance(d, Mapping):
            raise SpecError(source, "<plan>", f"must be a mapping, got {type(d).__name__}")
        try:
            workers = {}
            for wid, w in _mapping(d, "workers", source).items():
                where = f"workers.{wid}"
                if not isinstance(w, Mapping):
                    raise SpecError(source, where, "must be a mapping")
                workers[wid] = WorkerAssignment(
                    worker_id=_str(w, "worker_id", source, where), address=_str(w, "address", source, where),
                    task=_str(w, "task", source, where), variant=_str(w, "variant", source, where),
                    batch_size=_int(w, "batch_size", source, where, lo=1))
                if workers[wid].worker_id != wid:
                    raise SpecError(source, f"{where}.worker_id", f"is {workers[wid].worker_id!r}, key is {wid!r}")
            routing: dict[str, dict[str, dict[str, float]]] = {}
            for t, tbl in _mapping(d, "routing", source).items():
                routing[t] = {}
                for p in _mapping(d["routing"], t, source, "routing"):
                    routing[t][p] = {wid: _number(x, f"routing.{t}.{p}.{wid}", source, lo=0.0)
                                     for wid, x in _mapping(tbl, p, source, f"routing.{t}").items()}
            planned = {t: {p: _number(q, f"planned_qps.{t}.{p}", source, lo=0.0)
                           for p, q in _mapping(d["planned_qps"], t, source, "planned_qps").items()}
                       for t in _mapping(d, "planned_qps", source, optional=True)}
            latency: dict[str, dict[str, dict[int, float]]] = {}
            for t in _mapping(d, "latency_ms", source, optional=True):
                latency[t] = {}
                for v, by_batch in _mapping(d["latency_ms"], t, source, "latency_ms").items():
                    if not isinstance(by_batch, Mapping):
                        raise SpecError(source, f"latency_ms.{t}.{v}", "must be a mapping")
                    latency[t][v] = {_batch_key(b, f"latency_ms.{t}.{v}", source):
                                     _number(x, f"latency_ms.{t}.{v}.{b}", source, lo=0.0)
                                     for b, x in by_batch.items()}
            plan = Plan(
                version=_int(d, "version", source, "", lo=0), pipeline=_str(d, "pipeline", source, ""),
                workers=workers, routing=routing,
                admission_rate_qps=_opt_number(d, "admission_rate_qps", source),
                expected_accuracy=_opt_number(d, "expected_accuracy", source),
                capacity_qps=_opt_number(d, "capacity_qps", source),
                source=str(d.get("source", "operator")),
                created_unix_s=_opt_number(d, "created_unix_s", source) or time.time(),
                planned_qps=planned,
                worker_accuracy={w: _number(a, f"worker_accuracy.{w}", source, lo=0.0)
                                 for w, a in _mapping(d, "worker_accuracy", source, optional=True).items()},
                latency_ms=latency,
                calibration={k: _number(x, f"calibration.{k}", source, lo=0.0)
                             for k, x in _mapping(d, "calibration", source, optional=True).items()},
                planned_for_qps=_opt_number(d, "planned_for_qps", source),
                burst={t: _str(d["burst"], t, source, "burst")
                       for t in _mapping(d, "burst", source, optional=True)},
                standby={w: _task_variant(_str(d["standby"], w, source, "standby"), f"standby.{w}", source)
                         for w in _mapping(d, "standby", source, optional=True)},
            )
        except KeyError as exc:
            raise SpecError(source, str(exc.args[0]), "is required") from None
        return plan

    @staticmethod
    def from_json(text: str | bytes, source: str = "plan") -> "Plan":
        try:
            return Plan.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as exc:
            raise SpecError(source, "<plan>", f"not JSON: {exc}") from exc


def _mapping(d: Any, key: str, source: str, where: str = "", optional: bool = False) -> Mapping:
    name = f"{where}.{key}" if where else key
    if not isinstance(d, Mapping):
        raise SpecError(source, where or "<plan>", "must be a mapping")
    value = d.get(key)
    if value is None:
        if optional:
            return {}
        raise SpecError(source, name, "is required")
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SpecError(source, name, f"must be a mapping with string keys, got {type(value).__name__}")
    return value


def _str(d: Mapping, key: str, source: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(source, f"{where}.{key}" if where else key, f"must be a non-empty string, got {value!r}")
    return value


def _task_variant(value: str, where: str, source: str) -> str:
    """``"task/variant"``, both parts non-empty."""
    task, sep, variant = value.partition("/")
    if not sep or not task or not variant:
        raise SpecError(source, where, f"must be 'task/variant', got {value!r}")
    return value


def _int(d: Mapping, key: str, source: str, where: str, lo: int | None = None) -> int:
    value = d.get(key)
    name = f"{where}.{key}" if where else key
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(source, name, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise SpecError(source, name, f"must be >= {lo}, got {value}")
    return value


def _number(value: Any, name: str, source: str, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise SpecError(source, name, f"must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise SpecError(source, name, f"must be >= {lo:g}, got {value!r}")
    return float(value)


def _opt_number(d: Mapping, key: str, source: str) -> float | None:
    value = d.get(key)
    return None if value is None else _number(value, key, source)


def _batch_key(b: Any, name: str, source: str) -> int:
    try:
        n = int(b)
    except (TypeError, ValueError):
        raise SpecError(source, name, f"batch size {b!r} is not an integer") from None
    if n < 1 or str(n) != str(b).strip():
        raise SpecError(source, name, f"batch size {b!r} must be an integer >= 1")
    return n


def validate_plan(plan: Plan, spec: PipelineSpec) -> None:
    """Check a plan against its pipeline spec; raise SpecError naming the field."""
    src = f"plan v{plan.version}"
    if plan.pipeline != spec.name:
        raise SpecError(src, "pipeline", f"is {plan.pipeline!r}, spec is {spec.name!r}")
    for wid, w in plan.workers.items():
        try:
            task = spec.task(w.task)
            task.variant(w.variant)
        except KeyError as exc:
            raise SpecError(src, f"workers.{wid}", str(exc.args[0])) from None
        if w.batch_size < 1:
            raise SpecError(src, f"workers.{wid}.batch_size", "must be >= 1")
    for t in spec.tasks:
        if not plan.workers_of(t.name):
            raise SpecError(src, "workers", f"no worker serves task {t.name!r}")
        table = plan.routing.get(t.name)
        if not table:
            raise SpecError(src, f"routing.{t.name}", "is missing")
        for path, weights in table.items():
            for wid, x in weights.items():
                if wid not in plan.workers or plan.workers[wid].task != t.name:
                    raise SpecError(src, f"routing.{t.name}.{path}", f"{wid!r} is not a worker of {t.name!r}")
                if x < 0:
                    raise SpecError(src, f"routing.{t.name}.{path}.{wid}", "weight must be >= 0")
            if weights and abs(sum(weights.values()) - 1.0) > 1e-6:
                raise SpecError(src, f"routing.{t.name}.{path}", "weights must sum to 1")
    for wid, tv in plan.standby.items():
        if wid in plan.workers:
            raise SpecError(src, f"standby.{wid}", "is a worker the plan runs, not a parked one")
        task, _, variant = tv.partition("/")
        try:
            spec.task(task).variant(variant)
        except KeyError as exc:
            raise SpecError(src, f"standby.{wid}", str(exc.args[0])) from None


# ---------------------------------------------------------------------------
# Operator plan files: the desired (task, variant, batch size, replicas) mix.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """``replicas`` workers of ``task`` should run ``variant`` at ``batch_size``."""

    task: str
    variant: str
    batch_size: int
    replicas: int
    share: float | None = None   # optional fraction of the task's traffic for this variant


def parse_plan_file(data: Any, spec: PipelineSpec, source: str = "plan file") -> list[Allocation]:
    """Validate an operator plan file: ``{pipeline: ocr, allocations: [{task, variant, batch_size, replicas}]}``."""
    if isinstance(data, (str, bytes)):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise SpecError(source, "<file>", f"cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(source, "<root>", "must be a mapping")
    if data.get("pipeline") != spec.name:
        raise SpecError(source, "pipeline", f"must be {spec.name!r}, got {data.get('pipeline')!r}")
    raw = data.get("allocations")
    if not isinstance(raw, list) or not raw:
        raise SpecError(source, "allocations", "must be a non-empty list")
    out = []
    for i, a in enumerate(raw):
        where = f"allocations[{i}]"
        if not isinstance(a, dict):
            raise SpecError(source, where, "must be a mapping")
        try:
            task = spec.task(str(a.get("task")))
        except KeyError:
            raise SpecError(source, f"{where}.task", f"unknown task {a.get('task')!r}") from None
        try:
            task.variant(str(a.get("variant")))
        except KeyError:
            raise SpecError(source, f"{where}.variant",
                            f"task {task.name!r} has no variant {a.get('variant')!r}") from None
        b, r = a.get("batch_size", 1), a.get("replicas", 1)
        if not isinstance(b, int) or b < 1:
            raise SpecError(source, f"{where}.batch_size", f"must be an integer >= 1, got {b!r}")
        if not isinstance(r, int) or r < 1:
            raise SpecError(source, f"{where}.replicas", f"must be an integer >= 1, got {r!r}")
        share = a.get("share")
        if share is not None and (not isinstance(share, (int, float)) or not 0 <= share <= 1):
            raise SpecError(source, f"{where}.share", f"must be in [0, 1], got {share!r}")
        out.append(Allocation(task.name, str(a["variant"]), b, r, None if share is None else float(share)))
    for t in spec.tasks:
        mine = [a for a in out if a.task == t.name]
        if not mine:
            raise SpecError(source, "allocations", f"no allocation for task {t.name!r}")
        # the traffic split uniform_routing makes: given shares, else replica counts
        total = sum(a.share if a.share is not None else a.replicas for a in mine)
        if total <= 0:
            raise SpecError(source, "allocations",
                            f"every variant of task {t.name!r} has share 0: at least one must take traffic")
    return out


def load_plan_file(path: str | Path, spec: PipelineSpec) -> list[Allocation]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "<file>", "does not exist")
    return parse_plan_file(path.read_text(), spec, source=str(path))


@dataclass(frozen=True)
class RegisteredWorker:
    worker_id: str
    address: str
    task: str


def bind_pool(allocations: list[Allocation], workers: list[RegisteredWorker], current: Plan | None,
              task_order: list[str], since: Mapping[str, float] | None = None) -> list[RegisteredWorker]:
    """Give the pool's workers (``task == ""``) the tasks the allocations need beyond the
    task-bound workers: keep a pool worker on the task it runs in ``current`` (those
    running a wanted variant first, then those on the task since longest, by ``since``:
    worker -> when it took the task; a worker that took it a moment ago may still be
    loading its model, one that has served it for a while is not), then take workers that
    ran nothing, then ones released by another task. Pool workers no task needs are left
    out (parked)."""
    pool = sorted((w for w in workers if not w.task), key=lambda w: w.worker_id)
    bound = [w for w in workers if w.task]
    if not pool:
        return list(workers)
    need: Counter = Counter()
    wanted: dict[str, set] = defaultdict(set)
    for a in allocations:
        need[a.task] += a.replicas
        wanted[a.task].add(a.variant)
    for w in bound:
        need[w.task] -= 1
    cur = dict(current.workers) if current else {}
    ids = [w.worker_id for w in pool]
    taken: dict[str, str] = {}
    for task in task_order:
        mine = [w for w in ids if w in cur and cur[w].task == task]
        mine.sort(key=lambda w: (cur[w].variant not in wanted[task], (since or {}).get(w, 0.0), w))
        for w in mine[:max(0, need[task])]:
            taken[w] = task
    free = [w for w in ids if w not in cur] + [w for w in ids if w in cur and w not in taken]
    for task in task_order:
        short = need[task] - sum(1 for t in taken.values() if t == task)
        while short > 0 and free:
            taken[free.pop(0)] = task
            short -= 1
    return bound + [RegisteredWorker(w.worker_id, w.address, taken[w.worker_id])
                    for w in pool if w.worker_id in taken]


def assign_workers(
    allocations: list[Allocation],
    workers: list[RegisteredWorker],
    current: Plan | None,
) -> dict[str, WorkerAssignment]:
    """Map registered workers onto the allocations, moving as few workers as possible.

    A worker that already runs a wanted (variant, batch size) keeps it; the remaining
    slots are filled by the remaining workers of the same task in a stable order.
    Slots beyond the available workers stay unfilled (the plan then serves with fewer
    replicas); surplus workers are left idle (unassigned).
    """
    slots: dict[str, list[tuple[str, int]]] = {}
    for a in allocations:
        slots.setdefault(a.task, []).extend([(a.variant, a.batch_size)] * a.replicas)
    out: dict[str, WorkerAssignment] = {}
    by_task: dict[str, list[RegisteredWorker]] = {}
    for w in sorted(workers, key=lambda w: w.worker_id):
        by_task.setdefault(w.task, []).append(w)
    for task, wanted in slots.items():
        free = list(by_task.get(task, []))
        remaining = list(wanted)
        # 1) keep workers that already run a wanted slot
        for w in list(free):
            cur = current.workers.get(w.worker_id) if current else None
            if cur and (cur.variant, cur.batch_size) in remaining:
                remaining.remove((cur.variant, cur.batch_size))
                out[w.worker_id] = WorkerAssignment(w.worker_id, w.address, task, cur.variant, cur.batch_size)
                free.remove(w)
        # 2) prefer moving workers whose variant matches (only the batch size changes)
        for slot in list(remaining):
            match = next((w for w in free if current and w.worker_id in current.workers
                          and current.workers[w.worker_id].variant == slot[0]), None)
            if match is not None:
                out[match.worker_id] = WorkerAssignment(match.worker_id, match.address, task, *slot)
                free.remove(match)
                remaining.remove(slot)
        for slot, w in zip(list(remaining), list(free)):
            out[w.worker_id] = WorkerAssignment(w.worker_id, w.address, task, *slot)
    return out


def uniform_routing(assignments: Mapping[str, WorkerAssignment], allocations: list[Allocation]
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Routing for an operator plan: each variant gets its ``share`` of a task's traffic
    (or a share proportional to its replicas), split evenly over its workers."""
    routing: dict[str, dict[str, dict[str, float]]] = {}
    tasks = {a.task for a in allocations}
    for task in tasks:
        ws = [w for w in assignments.values() if w.task == task]
        if not ws:
            continue
        variants = sorted({w.variant for w in ws})
        shares = {}
        for v in variants:
            given = [a.share for a in allocations if a.task == task and a.variant == v and a.share is not None]
            shares[v] = sum(given) if given else float(sum(1 for w in ws if w.variant == v))
        total = sum(shares.values()) or 1.0
        weights: dict[str, float] = {}
        for v in variants:
            members = [w.worker_id for w in ws if w.variant == v]
            for wid in members:
                weights[wid] = shares[v] / total / len(members)
        s = sum(weights.values())
        if s <= 0:
            # only share-0 variants have workers (the others' workers are not registered):
            # serving with them beats serving nothing; the plan says which ones run
            weights = {w.worker_id: 1.0 for w in ws}
            s = float(len(ws))
        routing[task] = {ANY_PATH: {k: x / s for k, x in sorted(weights.items())}}
    return routing
