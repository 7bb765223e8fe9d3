"""Pipeline profiles: what the planner knows about every model variant.

One format for every pipeline (JSON, see ``docs/planner.md`` and ``profiles/README.md``)::

    {
      "format": "pipeserve-profile/1",        # optional on read, always written
      "name": "traffic_analysis",
      "slo_ms": 250,
      "device": "GTX 1080 Ti",                 # device the latencies were measured on
      "provenance": "where the numbers come from",
      "tasks": [                                # the first task is the root
        {"name": "object_detection",
         "children": ["car_classification", "facial_recognition"],
         "variants": [
           {"name": "yolov5n", "accuracy": 0.55,
            "device": "GTX 1080 Ti",           # optional, overrides the profile's device
            "load_s": 2.5,                       # optional: model load time (swap cost)
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],  # optional: what
                                                 # the measured ONNX Runtime session really got
            "latency_ms": {"1": {"p50_ms": 9.4, "p95_ms": 12.9}, "2": {...}}}],
         "fan_out": {"yolov5n": {"car_classification": 1.985, "facial_recognition": 0.6}}},
        ...],
      "path_accuracy": {"yolov5n/efficientnet-b0": 0.51},  # optional measured chain accuracy
      "sharing": {"GTX 1080 Ti": {"1": 1.0, "2": 1.4, "4": 2.6}}   # optional, see below
    }

``path_accuracy["v1/v2"]`` is keyed by the variants of one root-to-leaf chain joined
with ``/``; where present it overrides the product of the variant accuracies
(:meth:`PipelineProfile.path_accuracy_of`).

``fan_out[u][child]`` is the mean number of queries that one query processed by
variant ``u`` sends to ``child``; it is required for every variant of a task with
children. Loading validates every field and raises :class:`SpecError` naming it.

``sharing[device][k]`` is what ``k`` workers busy at once on one device cost: the p50
latency of a batch with ``k`` worker processes running, over its p50 with one
(``python -m services.tools.sharing``). Absent: no contention is modelled (every
worker runs as fast as the profile says, whatever else runs beside it). The planner
and the simulator read it through :mod:`services.planner.sharing`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.common.errors import SpecError

FORMAT = "pipeserve-profile/1"


@dataclass(frozen=True)
class LatencyPoint:
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class VariantProfile:
    name: str
    task: str
    accuracy: float
    latency_ms: Mapping[int, LatencyPoint]   # batch size -> latency of one batch
    device: str = ""
    load_s: float | None = None
    providers: tuple[str, ...] = ()          # ONNX Runtime providers the session got

    def latency(self, batch: int, quantile: str = "p95") -> float:
        p = self.latency_ms[batch]
        return p.p95_ms if quantile == "p95" else p.p50_ms

    def throughput_qps(self, batch: int, quantile: str = "p95") -> float:
        """Queries per second of one worker at this batch size: ``b / latency(b)``."""
        return batch * 1000.0 / self.latency(batch, quantile)


@dataclass(frozen=True)
class TaskProfile:
    name: str
    variants: tuple[VariantProfile, ...]
    children: tuple[str, ...] = ()
    fan_out: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def variant(self, name: str) -> VariantProfile:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"task {self.name!r} has no variant {name!r}")


@dataclass(frozen=True)
class PipelineProfile:
    name: str
    slo_ms: float
    tasks: tuple[TaskProfile, ...]
    device: str = ""
    provenance: str = ""
    path_accuracy: Mapping[str, float] = field(default_factory=dict)
    source: str = "<memory>"
    sharing: Mapping[str, Mapping[int, float]] = field(default_factory=dict)   # device -> k -> factor

    @property
    def root(self) -> TaskProfile:
        return self.tasks[0]

    def task(self, name: str) -> TaskProfile:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"profile {self.name!r} has no task {name!r}")

    def parent_of(self, name: str) -> str | None:
        for t in self.tasks:
            if name in t.children:
                return t.name
        return None

    def chains(self) -> list[tuple[str, ...]]:
        """Root-to-leaf task sequences, depth first in declaration order."""
        out: list[tuple[str, ...]] = []

        def walk(name: str, prefix: tuple[str, ...]) -> None:
            t = self.task(name)
            here = prefix + (name,)
            if not t.children:
                out.append(here)
            for c in t.children:
                walk(c, here)

        walk(self.root.name, ())
        return out

    def path_accuracy_of(self, variants: tuple[str, ...] | list[str]) -> float:
        """Accuracy of one chain's variant path: the measured ``path_accuracy`` entry when
        there is one, else the product of the variant accuracies."""
        key = "/".join(variants)
        if key in self.path_accuracy:
            return self.path_accuracy[key]
        by_name = {v.name: v for t in self.tasks for v in t.variants}
        a = 1.0
        for name in variants:
            a *= by_name[name].accuracy
        return a

    def key(self) -> str:
        """A stable identity for caches: the profile's content."""
        return json.dumps(profile_to_dict(self), sort_keys=True)


# ---------------------------------------------------------------------------
# parsing and validation
# ---------------------------------------------------------------------------

def _num(value: Any, where: str, source: str, lo: float | None = None, hi: float | None = None,
         strict_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(source, where, f"must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (strict_lo and value == lo)):
        raise SpecError(source, where, f"must be {'>' if strict_lo else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise SpecError(source, where, f"must be <= {hi}, got {value!r}")
    return float(value)


def _name(value: Any, where: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(source, where, "must be a non-empty string")
    if any(c in value for c in " /|,"):
        raise SpecError(source, where, f"{value!r} must not contain spaces, '/', '|' or ','")
    return value


def _variant(rv: Any, task: str, where: str, source: str, device: str) -> VariantProfile:
    if not isinstance(rv, dict):
        raise SpecError(source, where, "must be a mapping")
    known = {"name", "accuracy", "latency_ms", "device", "load_s", "providers"}
    for k in rv:
        if k not in known:
            raise SpecError(source, f"{where}.{k}", f"unknown field (expected one of {sorted(known)})")
    name = _name(rv.get("name"), f"{where}.name", source)
    if "accuracy" not in rv:
        raise SpecError(source, f"{where}.accuracy", "is required")
    acc = _num(rv["accuracy"], f"{where}.accuracy", source, 0.0, 1.0)
    raw = rv.get("latency_ms")
    if not isinstance(raw, dict) or not raw:
        raise SpecError(source, f"{where}.latency_ms", "must be a non-empty mapping batch size -> {p50_ms, p95_ms}")
    lat: dict[int, LatencyPoint] = {}
    for b, p in raw.items():
        lw = f"{where}.latency_ms.{b}"
        try:
            bi = int(b)
        except (TypeError, ValueError):
            raise SpecError(source, lw, "batch size must be a positive integer") from None
        if bi < 1 or str(bi) != str(b).strip():
            raise SpecError(source, lw, "batch size must be a positive integer")
        if not isinstance(p, dict) or "p50_ms" not in p or "p95_ms" not in p:
            raise SpecError(source, lw, "must be a mapping with p50_ms and p95_ms")
        p50 = _num(p["p50_ms"], f"{lw}.p50_ms", source, 0.0, strict_lo=True)
        p95 = _num(p["p95_ms"], f"{lw}.p95_ms", source, 0.0, strict_lo=True)
        if p95 < p50:
            raise SpecError(source, f"{lw}.p95_ms", f"must be >= p50_ms ({p95} < {p50})")
        lat[bi] = LatencyPoint(p50, p95)
    vdev = rv.get("device", device)
    if not isinstance(vdev, str):
        raise SpecError(source, f"{where}.device", "must be a string")
    load_s = rv.get("load_s")
    if load_s is not None:
        load_s = _num(load_s, f"{where}.load_s", source, 0.0)
    providers = rv.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(x, str) and x for x in providers):
        raise SpecError(source, f"{where}.providers", "must be a list of provider names")
    return VariantProfile(name=name, task=task, accuracy=acc, latency_ms=dict(sorted(lat.items())),
                          device=vdev, load_s=load_s, providers=tuple(providers))


def parse_profile(data: Any, source: str = "<memory>") -> PipelineProfile:
    """Validate a profile mapping; raise SpecError naming the offending field."""
    if not isinstance(data, dict):
        raise SpecError(source, "<root>", "must be a mapping")
    known = {"format", "name", "slo_ms", "device", "provenance", "tasks", "path_accuracy", "description",
             "sharing"}
    for k in data:
        if k not in known:
            raise SpecError(source, str(k), f"unknown field (expected one of {sorted(known)})")
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise SpecError(source, "format", f"must be {FORMAT!r}, got {fmt!r}")
    name = _name(data.get("name"), "name", source)
    if "slo_ms" not in data:
        raise SpecError(source, "slo_ms", "is required")
    slo = _num(data["slo_ms"], "slo_ms", source, 0.0, strict_lo=True)
    device = data.get("device", "")
    if not isinstance(device, str):
        raise SpecError(source, "device", "must be a string")
    prov = data.get("provenance", "")
    if not isinstance(prov, str):
        raise SpecError(source, "provenance", "must be a string")
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise SpecError(source, "tasks", "must be a non-empty list")
    tasks: list[TaskProfile] = []
    seen_v: set[str] = set()
    for i, rt in enumerate(raw_tasks):
        where = f"tasks[{i}]"
        if not isinstance(rt, dict):
            raise SpecError(source, where, "must be a mapping")
        for k in rt:
            if k not in {"name", "children", "variants", "fan_out"}:
                raise SpecError(source, f"{where}.{k}", "unknown field")
        tname = _name(rt.get("name"), f"{where}.name", source)
        children = rt.get("children") or []
        if not isinstance(children, list) or not all(isinstance(c, str) and c for c in children):
            raise SpecError(source, f"{where}.children", "must be a list of task names")
        rvs = rt.get("variants")
        if not isinstance(rvs, list) or not rvs:
            raise SpecError(source, f"{where}.variants", "must be a non-empty list")
        variants = []
        for j, rv in enumerate(rvs):
            v = _variant(rv, tname, f"{where}.variants[{j}]", source, device)
            if v.name in seen_v:
                raise SpecError(source, f"{where}.variants[{j}].name", f"duplicate variant name {v.name!r}")
            seen_v.add(v.name)
            variants.append(v)
        fan = rt.get("fan_out") or {}
        if not isinstance(fan, dict):
            raise SpecError(source, f"{where}.fan_out", "must be a mapping variant -> child -> mean")
        fan_out: dict[str, dict[str, float]] = {}
        vnames = {v.name for v in variants}
        for vn, per_child in fan.items():
            if vn not in vnames:
                raise SpecError(source, f"{where}.fan_out.{vn}", f"task {tname!r} has no variant {vn!r}")
            if not isinstance(per_child, dict):
                raise SpecError(source, f"{where}.fan_out.{vn}", "must be a mapping child -> mean")
            for c, m in per_child.items():
                if c not in children:
                    raise SpecError(source, f"{where}.fan_out.{vn}.{c}", f"{c!r} is not a child of {tname!r}")
                fan_out.setdefault(vn, {})[c] = _num(m, f"{where}.fan_out.{vn}.{c}", source, 0.0)
        for v in variants:
            for c in children:
                if c not in fan_out.get(v.name, {}):
                    raise SpecError(source, f"{where}.fan_out.{v.name}.{c}", "is required for every variant and child")
        tasks.append(TaskProfile(tname, tuple(variants), tuple(children), fan_out))
    names = [t.name for t in tasks]
    parents: dict[str, str] = {}
    for i, t in enumerate(tasks):
        if names.count(t.name) > 1:
            raise SpecError(source, f"tasks[{i}].name", f"duplicate task name {t.name!r}")
        for c in t.children:
            if c not in names:
                raise SpecError(source, f"tasks[{i}].children", f"unknown task {c!r}")
            if c in parents or c == names[0] or c == t.name:
                raise SpecError(source, f"tasks[{i}].children", f"task {c!r} would have two parents (pipelines are trees)")
            parents[c] = t.name
    missing = set(names[1:]) - set(parents)
    if missing:
        raise SpecError(source, "tasks", f"the first task must be the only root; unreachable: {sorted(missing)}")
    pa = data.get("path_accuracy") or {}
    if not isinstance(pa, dict):
        raise SpecError(source, "path_accuracy", "must be a mapping 'v1/v2/...' -> accuracy")
    path_acc = {str(k): _num(x, f"path_accuracy.{k}", source, 0.0, 1.0) for k, x in pa.items()}
    return PipelineProfile(name=name, slo_ms=slo, tasks=tuple(tasks), device=device, provenance=prov,
                           path_accuracy=path_acc, source=source, sharing=_sharing(data.get("sharing"), source))


def _sharing(raw: Any, source: str) -> dict[str, dict[int, float]]:
    """``sharing``: device -> {k: factor}; k a positive integer, a factor finite and > 0
    (not >= 1: on a busy host a measured ratio can come out just under 1), and exactly 1
    at k = 1, the reference every other factor is a ratio to."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(source, "sharing", "must be a mapping device -> {workers: factor}")
    out: dict[str, dict[int, float]] = {}
    for dev, table in raw.items():
        where = f"sharing.{dev}"
        if not isinstance(dev, str) or not dev.strip():
            raise SpecError(source, "sharing", "device names must be non-empty strings")
        if not isinstance(table, dict) or not table:
            raise SpecError(source, where, "must be a non-empty mapping workers -> latency factor")
        parsed: dict[int, float] = {}
        for k, f in table.items():
            try:
                ki = int(k)
            except (TypeError, ValueError):
                raise SpecError(source, f"{where}.{k}", "workers must be a positive integer") from None
            if ki < 1 or str(ki) != str(k).strip():
                raise SpecError(source, f"{where}.{k}", "workers must be a positive integer")
            parsed[ki] = _num(f, f"{where}.{k}", source, 0.0, strict_lo=True)
        if parsed.get(1, 1.0) != 1.0:
            raise SpecError(source, f"{where}.1", f"must be 1.0 (the reference), got {parsed[1]!r}")
        out[dev] = dict(sorted(parsed.items()))
    return out


def load_profile(path: str | Path) -> PipelineProfile:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "<file>", "does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(str(path), "<file>", f"cannot be parsed: {exc}") from exc
    return parse_profile(data, source=str(path))


def profile_to_dict(p: PipelineProfile) -> dict[str, Any]:
    tasks = []
    for t in p.tasks:
        rt: dict[str, Any] = {"name": t.name, "children": list(t.children), "variants": []}
        for v in t.variants:
            rv: dict[str, Any] = {"name": v.name, "accuracy": v.accuracy,
                                  "latency_ms": {str(b): {"p50_ms": x.p50_ms, "p95_ms": x.p95_ms}
                                                 for b, x in sorted(v.latency_ms.items())}}
            if v.device and v.device != p.device:
                rv["device"] = v.device
            if v.load_s is not None:
                rv["load_s"] = v.load_s
            if v.providers:
                rv["providers"] = list(v.providers)
            rt["variants"].append(rv)
        if t.children:
            rt["fan_out"] = {vn: dict(m) for vn, m in t.fan_out.items()}
        tasks.append(rt)
    out: dict[str, Any] = {"format": FORMAT, "name": p.name, "slo_ms": p.slo_ms, "device": p.device,
                           "provenance": p.provenance, "tasks": tasks}
    if p.path_accuracy:
        out["path_accuracy"] = dict(p.path_accuracy)
    if p.sharing:
        out["sharing"] = {dev: {str(k): f for k, f in sorted(t.items())} for dev, t in p.sharing.items()}
    return out


def write_profile(p: PipelineProfile, path: str | Path) -> None:
    """Write a profile in the documented format (validated by re-parsing first)."""
    d = profile_to_dict(p)
    parse_profile(d, source=str(path))
    Path(path).write_text(json.dumps(d, indent=1) + "\n")
