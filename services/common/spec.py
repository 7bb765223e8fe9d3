"""Declarative pipeline specs: tasks, edges, variants and the end-to-end SLO.

A spec is a YAML or JSON file (see ``pipelines/ocr.yaml``). Loading validates every
field and raises :class:`SpecError` naming the offending field, e.g.
``pipelines/x.yaml: field 'tasks[1].variants[0].model': must be a non-empty string``.
"""
from __future__ import annotations

import re

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from services.common.errors import SpecError

DEFAULT_MAX_INPUT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_INPUT_SIDE = 4096
DEFAULT_MAX_INPUT_PIXELS = DEFAULT_MAX_INPUT_SIDE * DEFAULT_MAX_INPUT_SIDE


MAX_SHAPE_BUCKETS = 8   # "a small set": every bucket is warmed at every batch size a worker runs


@dataclass(frozen=True)
class ShapeBuckets:
    """The input shapes a variant's model is fed: each input is padded to the smallest
    bucket it fits, so a worker runs at most ``len(buckets) x batch sizes`` shapes and can
    warm them all before it serves (on a GPU each new shape costs a cuDNN algorithm search).

    ``widths``: line models (recognition), the padded widths at the model's height, ascending
    (a crop wider than the last is resized down to it). ``aspects``: page models
    (detection), ``(width, height)`` ratios of the padded input whose long side is the
    variant's ``side`` (a page is letterboxed into the bucket that keeps it largest).
    ``off``: no buckets, each batch padded to its own largest input (unbounded shapes).
    A variant without ``buckets`` in its spec gets its processor kind's default."""

    widths: tuple[int, ...] = ()
    aspects: tuple[tuple[int, int], ...] = ()
    off: bool = False

    @classmethod
    def none(cls) -> "ShapeBuckets":
        return cls(off=True)


@dataclass(frozen=True)
class VariantSpec:
    """One model variant of a task: its ONNX file and how to drive it."""

    name: str
    task: str
    model: str                      # path relative to the models directory
    processor: str                  # pre/post-processing kind, e.g. "ppocr_det"
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    accuracy: float | None = None   # optional prior; profiles supersede it
    buckets: ShapeBuckets | None = None   # None: the processor kind's default buckets


@dataclass(frozen=True)
class TaskSpec:
    name: str
    variants: tuple[VariantSpec, ...]
    children: tuple[str, ...] = ()

    def variant(self, name: str) -> VariantSpec:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"task {self.name!r} has no variant {name!r}")


@dataclass(frozen=True)
class InputSpec:
    kind: str = "image"             # encoded image bytes (PNG/JPEG) or an HxWx3 UINT8 tensor
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_side: int = DEFAULT_MAX_INPUT_SIDE
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS   # width x height, from the header: bounds decoding


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    slo_ms: float
    tasks: tuple[TaskSpec, ...]
    input: InputSpec = InputSpec()
    output: str = "regions"         # how the front door formats results: "ocr_lines" | "regions"
    source: str = "<memory>"
    plugins: tuple[str, ...] = ()   # modules that register the variants' processors

    @property
    def root(self) -> TaskSpec:
        return self.tasks[0]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"pipeline {self.name!r} has no task {name!r}")

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def parent_of(self, name: str) -> str | None:
        for t in self.tasks:
            if name in t.children:
                return t.name
        return None

    def variant(self, name: str) -> VariantSpec:
        for t in self.tasks:
            for v in t.variants:
                if v.name == name:
                    return v
        raise KeyError(f"pipeline {self.name!r} has no variant {name!r}")


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec file (YAML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "<file>", "does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SpecError(str(path), "<file>", f"cannot be parsed: {exc}") from exc
    return parse_spec(data, source=str(path))


def _req(d: Mapping[str, Any], key: str, where: str, source: str) -> Any:
    if key not in d or d[key] is None:
        raise SpecError(source, f"{where}{key}", "is required")
    return d[key]


def _name(value: Any, field_name: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(source, field_name, "must be a non-empty string")
    if any(c in value for c in " /|,"):
        raise SpecError(source, field_name, f"{value!r} must not contain spaces, '/', '|' or ','")
    return value


def _str_list(value: Any, field_name: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise SpecError(source, field_name, "must be a list of non-empty strings")
    return tuple(value)


def parse_buckets(value: Any, field_name: str, source: str) -> ShapeBuckets | None:
    """``buckets:`` of a variant: ``{widths: [...]}``, ``{aspects: ["W:H", ...]}``, ``off``
    (YAML reads a bare ``off`` as false), or absent (None: the processor kind's default)."""
    if value is None:
        return None
    if value is False or value == "off":
        return ShapeBuckets.none()
    if not isinstance(value, dict) or not value:
        raise SpecError(source, field_name, f"must be {{widths: [...]}}, {{aspects: [\"W:H\", ...]}} or off, "
                                            f"got {value!r}")
    unknown = sorted(set(map(str, value)) - {"widths", "aspects"})
    if unknown:
        raise SpecError(source, f"{field_name}.{unknown[0]}", "unknown field (expected 'widths' or 'aspects')")
    if len(value) != 1:
        raise SpecError(source, field_name, "give 'widths' (line models) or 'aspects' (page models), not both")
    (key, items), = value.items()
    where = f"{field_name}.{key}"
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_SHAPE_BUCKETS:
        raise SpecError(source, where, f"must be a list of 1 to {MAX_SHAPE_BUCKETS} buckets, got {items!r}")
    if key == "widths":
        if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in items):
            raise SpecError(source, where, f"must be positive whole numbers of pixels, got {items!r}")
        if any(b <= a for a, b in zip(items, items[1:])):
            raise SpecError(source, where, f"must be strictly increasing, got {items!r}")
        return ShapeBuckets(widths=tuple(items))
    aspects: list[tuple[int, int]] = []
    for a in items:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", a) if isinstance(a, str) else None
        if m is None or not int(m[1]) or not int(m[2]):
            raise SpecError(source, where, f"each aspect must be \"W:H\" with positive whole numbers, got {a!r}")
        w, h = int(m[1]), int(m[2])
        if any(w * h2 == h * w2 for w2, h2 in aspects):
            raise SpecError(source, where, f"aspect {a!r} repeats an earlier one")
        aspects.append((w, h))
    return ShapeBuckets(aspects=tuple(aspects))


def parse_spec(data: Any, source: str = "<memory>") -> PipelineSpec:
    if not isinstance(data, dict):
        raise SpecError(source, "<root>", "must be a mapping")
    known = {"name", "slo_ms", "tasks", "input", "output", "description", "plugins"}
    for key in data:
        if key not in known:
            raise SpecError(source, str(key), f"unknown field (expected one of {sorted(known)})")
    name = _name(_req(data, "name", "", source), "name", source)
    slo = _req(data, "slo_ms", "", source)
    if isinstance(slo, bool) or not isinstance(slo, (int, float)) or slo <= 0:
        raise SpecError(source, "slo_ms", f"must be a positive number of milliseconds, got {slo!r}")
    output = data.get("output", "regions")
    if output not in ("ocr_lines", "regions"):
        raise SpecError(source, "output", f"must be 'ocr_lines' or 'regions', got {output!r}")

    inp = data.get("input") or {}
    if not isinstance(inp, dict):
        raise SpecError(source, "input", "must be a mapping")
    input_spec = InputSpec(
        kind=str(inp.get("kind", "image")),
        max_bytes=int(inp.get("max_bytes", DEFAULT_MAX_INPUT_BYTES)),
        max_side=int(inp.get("max_side", DEFAULT_MAX_INPUT_SIDE)),
        max_pixels=int(inp.get("max_pixels", DEFAULT_MAX_INPUT_PIXELS)),
    )
    if input_spec.kind != "image":
        raise SpecError(source, "input.kind", f"only 'image' is supported, got {input_spec.kind!r}")
    if input_spec.max_bytes <= 0 or input_spec.max_side <= 0 or input_spec.max_pixels <= 0:
        raise SpecError(source, "input", "max_bytes, max_side and max_pixels must be positive")

    raw_tasks = _req(data, "tasks", "", source)
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise SpecError(source, "tasks", "must be a non-empty list")
    tasks: list[TaskSpec] = []
    seen_variants: set[str] = set()
    for i, rt in enumerate(raw_tasks):
        where = f"tasks[{i}]."
        if not isinstance(rt, dict):
            raise SpecError(source, f"tasks[{i}]", "must be a mapping")
        tname = _name(_req(rt, "name", where, source), f"{where}name", source)
        children = _str_list(rt.get("children"), f"{where}children", source)
        raw_variants = _req(rt, "variants", where, source)
        if not isinstance(raw_variants, list) or not raw_variants:
            raise SpecError(source, f"{where}variants", "must be a non-empty list")
        variants = []
        for j, rv in enumerate(raw_variants):
            vw = f"{where}variants[{j}]."
            if not isinstance(rv, dict):
                raise SpecError(source, f"{where}variants[{j}]", "must be a mapping")
            vname = _name(_req(rv, "name", vw, source), f"{vw}name", source)
            if vname in seen_variants:
                raise SpecError(source, f"{vw}name", f"duplicate variant name {vname!r}")
            seen_variants.add(vname)
            model = _req(rv, "model", vw, source)
            if not isinstance(model, str) or not model.strip():
                raise SpecError(source, f"{vw}model", "must be a non-empty string")
            processor = _req(rv, "processor", vw, source)
            if not isinstance(processor, str) or not processor:
                raise SpecError(source, f"{vw}processor", "must be a non-empty string")
            settings = rv.get("settings") or {}
            if not isinstance(settings, dict):
                raise SpecError(source, f"{vw}settings", "must be a mapping")
            acc = rv.get("accuracy")
            if acc is not None and (not isinstance(acc, (int, float)) or not 0 <= acc <= 1):
                raise SpecError(source, f"{vw}accuracy", f"must be in [0, 1], got {acc!r}")
            variants.append(VariantSpec(
                name=vname, task=tname, model=model, processor=processor,
                input_names=_str_list(rv.get("input_names"), f"{vw}input_names", source),
                output_names=_str_list(rv.get("output_names"), f"{vw}output_names", source),
                settings=dict(settings), accuracy=None if acc is None else float(acc),
                buckets=parse_buckets(rv.get("buckets"), f"{vw}buckets", source),
            ))
        tasks.append(TaskSpec(name=tname, variants=tuple(variants), children=children))

    names = [t.name for t in tasks]
    for i, t in enumerate(tasks):
        if t.name in names[:i]:
            raise SpecError(source, f"tasks[{i}].name", f"duplicate task name {t.name!r}")
    for i, t in enumerate(tasks):
        for c in t.children:
            if c not in names:
                raise SpecError(source, f"tasks[{i}].children", f"unknown task {c!r}")
            if c == t.name:
                raise SpecError(source, f"tasks[{i}].children", "a task cannot be its own child")
    parents: dict[str, str] = {}
    for i, t in enumerate(tasks):
        for c in t.children:
            if c in parents:
                raise SpecError(source, f"tasks[{i}].children",
                                f"task {c!r} already has parent {parents[c]!r} (pipelines are trees)")
            parents[c] = t.name
    roots = [t.name for t in tasks if t.name not in parents]
    if len(roots) != 1 or roots[0] != tasks[0].name:
        raise SpecError(source, "tasks", f"the first task must be the only root, found roots {roots}")
    # every task reachable from the root (no cycles, since each task has one parent)
    reach, stack = set(), [tasks[0].name]
    while stack:
        n = stack.pop()
        if n in reach:
            raise SpecError(source, "tasks", f"cycle through task {n!r}")
        reach.add(n)
        stack.extend(next(t for t in tasks if t.name == n).children)
    if reach != set(names):
        raise SpecError(source, "tasks", f"tasks not reachable from the root: {sorted(set(names) - reach)}")
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(
            isinstance(m, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", m)
            for m in plugins):
        raise SpecError(source, "plugins", f"must be a list of Python module names, got {plugins!r}")
    return PipelineSpec(name=name, slo_ms=float(slo), tasks=tuple(tasks), input=input_spec,
                        output=output, source=source, plugins=tuple(plugins))
