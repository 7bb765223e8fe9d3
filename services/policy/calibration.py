"""Plans from the host's real speed: measured batch times folded into the profile.

A profile is measured on one machine; machines of one kind differ up to ~4x, and a
cluster's processes share its cores. Workers report what their batches cost (model
time + pre-processing, the profile's definition) per variant and batch size; the
controller (and the simulator, with the same code) keeps, per variant, a smoothed ratio
``measured / profile p50`` and plans on the profile scaled by it:

- a variant with at least ``min_batches`` measured batches gets its own factor;
- a variant not measured yet gets the *host factor*: the batch-weighted geometric mean
  of the measured variants' factors (a host twice as slow is twice as slow for every
  model; closer than the profile's own figure until the variant has run);
- a detector's measured fan-out (regions per query) replaces the profile's, per variant,
  under the same floor.

:meth:`LatencyCalibrator.drift` says how far the factors have moved from those of the
profile in use; the planning policy re-plans when that passes ``margin`` (hysteresis: a
new compiled problem costs a solve, and noise must not re-plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

from services.planner.profile import LatencyPoint, PipelineProfile, TaskProfile

DEFAULT_MIN_BATCHES = 10     # batches before a variant's own factor is trusted
DEFAULT_ALPHA = 0.03         # weight of one batch in the smoothed ratio (a report of n: 1 - 0.97^n)
DEFAULT_MARGIN = 0.3         # re-plan when a factor moves by more than 30 % (noise on a busy host: ~25 %)


@dataclass(frozen=True)
class Timing:
    """Batches of one (task, variant, batch size) since the last report."""

    task: str
    variant: str
    batch_size: int
    count: int
    total_ms: float
    items: int = 0
    regions: int = 0


@dataclass
class _Track:
    ratio: float | None = None     # smoothed measured / profile p50
    batches: int = 0
    items: int = 0
    regions: int = 0


class LatencyCalibrator:
    def __init__(self, profile: PipelineProfile, min_batches: int = DEFAULT_MIN_BATCHES,
                 alpha: float = DEFAULT_ALPHA, margin: float = DEFAULT_MARGIN) -> None:
        self.base = profile
        self.min_batches = min_batches
        self.alpha = alpha
        self.margin = margin
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._variants = {(t.name, v.name): v for t in profile.tasks for v in t.variants}
        self.in_use: dict[tuple[str, str], float] = {}   # factors of the profile last planned on

    def observe(self, timings: Iterable[Timing]) -> None:
        for t in timings:
            v = self._variants.get((t.task, t.variant))
            if v is None or t.count <= 0 or t.total_ms <= 0:
                continue
            known = sorted(v.latency_ms)
            size = next((b for b in known if b >= t.batch_size), known[-1])
            expected = v.latency_ms[size].p50_ms
            if size != t.batch_size:   # a partial batch: scale the next profiled size linearly
                expected *= t.batch_size / size
            ratio = (t.total_ms / t.count) / expected
            tr = self._tracks.setdefault((t.task, t.variant), _Track())
            # one report of n batches weighs like n single observations; until the
            # smoothing has seen ~1/alpha batches it is a plain mean (no bias to the first)
            w = max(t.count / (tr.batches + t.count), 1.0 - (1.0 - self.alpha) ** t.count)
            tr.ratio = ratio if tr.ratio is None else tr.ratio + w * (ratio - tr.ratio)
            tr.batches += t.count
            tr.items += t.items
            tr.regions += t.regions

    def seed(self, factors: Mapping[str, float]) -> int:
        """Start from factors measured before (a plan's ``calibration``: ``"task/variant"
        -> factor``), trusted as ``min_batches`` batches each, so that a restarted
        controller plans on the speed its predecessor measured, not on the raw profile.
        Unknown variants and non-positive factors are ignored; returns how many were taken."""
        taken = 0
        for key, f in factors.items():
            task, _, variant = str(key).partition("/")
            if (task, variant) not in self._variants or not (isinstance(f, (int, float)) and f > 0):
                continue
            self._tracks[(task, variant)] = _Track(ratio=float(f), batches=self.min_batches)
            taken += 1
        if taken:
            self.in_use = self.factors()   # the plan was made on these: no drift yet
        return taken

    def host_factor(self) -> float | None:
        """Geometric mean of the trusted variants' factors, weighted by their batches."""
        num = den = 0.0
        for tr in self._tracks.values():
            if tr.batches >= self.min_batches and tr.ratio and tr.ratio > 0:
                num += tr.batches * math.log(tr.ratio)
                den += tr.batches
        return math.exp(num / den) if den else None

    def factors(self) -> dict[tuple[str, str], float]:
        """``(task, variant) -> factor`` for every variant of the profile (1.0 while
        nothing is measured)."""
        host = self.host_factor() or 1.0
        out = {}
        for key in self._variants:
            tr = self._tracks.get(key)
            out[key] = tr.ratio if tr is not None and tr.batches >= self.min_batches and tr.ratio else host
        return out

    def fan_out(self, task: str, variant: str) -> float | None:
        """Measured regions per query of a variant, once trusted."""
        tr = self._tracks.get((task, variant))
        if tr is None or tr.batches < self.min_batches or tr.items <= 0:
            return None
        return tr.regions / tr.items

    def drift(self) -> float:
        """The largest relative change of a factor against the profile in use."""
        worst = 0.0
        for key, f in self.factors().items():
            used = self.in_use.get(key, 1.0)
            worst = max(worst, abs(f / used - 1.0))
        return worst

    def needs_replan(self) -> bool:
        return self.drift() > self.margin

    def calibrated(self) -> PipelineProfile:
        """The base profile with every variant's latencies scaled by its factor and the
        trusted measured fan-outs; marks these factors as the ones in use."""
        factors = self.factors()
        self.in_use = dict(factors)
        fan = self._measured_fan_out()
        if not fan and all(f == 1.0 for f in factors.values()):
            return self.base          # nothing measured yet: the profile itself (caches key on it)
        return scale_profile(self.base, factors, fan, note=summary(factors))

    def _measured_fan_out(self) -> dict[tuple[str, str], float]:
        out = {}
        for t in self.base.tasks:
            if len(t.children) != 1:   # a region goes to every child: one fan-out per child only
                continue               # when there is one child (profiles may differ per child)
            for v in t.variants:
                m = self.fan_out(t.name, v.name)
                if m is not None:
                    out[(t.name, v.name)] = m
        return out


def scale_profile(profile: PipelineProfile, factors: Mapping[tuple[str, str], float],
                  fan_out: Mapping[tuple[str, str], float] | None = None, note: str = "") -> PipelineProfile:
    """``profile`` with latencies of variant (task, v) multiplied by ``factors[(task, v)]``
    (missing: 1.0). ``fan_out[(task, v)]`` (regions per query) replaces the profile's
    fan-out of that variant towards every child task."""
    tasks = []
    for t in profile.tasks:
        variants = tuple(
            replace(v, latency_ms={b: LatencyPoint(p.p50_ms * factors.get((t.name, v.name), 1.0),
                                                   p.p95_ms * factors.get((t.name, v.name), 1.0))
                                   for b, p in v.latency_ms.items()})
            for v in t.variants)
        fan = {v: dict(children) for v, children in t.fan_out.items()}
        for (task, v), m in (fan_out or {}).items():
            if task == t.name and v in fan:
                fan[v] = {c: m for c in fan[v]}
        tasks.append(TaskProfile(t.name, variants, t.children, fan))
    provenance = profile.provenance + (f" Calibrated: {note}." if note else "")
    return replace(profile, tasks=tuple(tasks), provenance=provenance)


def summary(factors: Mapping[tuple[str, str], float]) -> str:
    """A short text of the factors, e.g. ``det x1.92 (det_v6small_480 x1.95), rec x2.10``."""
    by_task: dict[str, list[float]] = {}
    for (task, _), f in factors.items():
        by_task.setdefault(task, []).append(f)
    return ", ".join(f"{t} x{math.exp(sum(map(math.log, fs)) / len(fs)):.2f}" for t, fs in by_task.items())
