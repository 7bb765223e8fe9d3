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
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping[str, Any], source: str = "plan") -> "Plan":
        try:
            workers = {wid: WorkerAssignment(**w) for wid, w in d["workers"].items()}
            routing = {t: {p: {wid: float(x) for wid, x in w.items()} for p, w in tbl.items()}
                       for t, tbl in d["routing"].items()}
            plan = Plan(
                version=int(d["version"]), pipeline=str(d["pipeline"]), workers=workers,
                routing=routing,
                admission_rate_qps=d.get("admission_rate_qps"),
                expected_accuracy=d.get("expected_accuracy"),
                capacity_qps=d.get("capacity_qps"),
                source=str(d.get("source", "operator")),
                created_unix_s=float(d.get("created_unix_s", time.time())),
                planned_qps={t: {p: float(q) for p, q in paths.items()}
                             for t, paths in (d.get("planned_qps") or {}).items()},
                worker_accuracy={w: float(a) for w, a in (d.get("worker_accuracy") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(source, "<plan>", f"malformed plan: {exc!r}") from exc
        return plan

    @staticmethod
    def from_json(text: str | bytes, source: str = "plan") -> "Plan":
        try:
            return Plan.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as exc:
            raise SpecError(source, "<plan>", f"not JSON: {exc}") from exc


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
        if not any(a.task == t.name for a in out):
            raise SpecError(source, "allocations", f"no allocation for task {t.name!r}")
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
        routing[task] = {ANY_PATH: {k: x / s for k, x in sorted(weights.items())}}
    return routing
