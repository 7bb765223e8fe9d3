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

Stalls are not speed. On a GPU the first call at a new input shape (a cuDNN algorithm
search) or right after a model load takes 0.4-2.9 s where a warm batch takes 5-40 ms; one
such batch read as speed made a host look 143-179x slower than its profile. So a batch is
a *stall*, and left out, when it is more than ``outlier_k`` times what the variant's
other batches take (scaled by the profile's own spread, p95 / p50, so a heavy-tailed
variant's tail is not mistaken for one):

- within a report, its slowest batch (``max_ms``) against the mean of the others;
- a report against the variant's factor once trusted: slow reports are held back, and
  taken (the host did slow down) only once ``min_batches`` batches in a row are that
  slow;
- before that, while a variant gathers its first ``min_batches`` batches, every report
  against the batch-weighted median of them all (so a stall among the first batches does
  not set the start).

Sharing is not speed either. With a ``sharing`` table in the profile
(:mod:`services.planner.sharing`) the planner multiplies the latencies by the measured
factor of the busy workers a plan implies. A batch measured while k workers were busy
already holds that contention, so the factor reported here is against the profile
*at that load*: ``measured / (profile p50 x sharing factor at k)``. Then a host that is
only as slow as its sharing table says calibrates to 1.0, and the planner's factor is
applied once, not twice. ``k`` is the batch's own report (``Timing.busy``: the mean
number of workers busy on its device while the batches ran, itself included, as the
simulator reports it) or, where a report does not know it (a live worker sees only
itself), the load of the plan in force, set by :meth:`LatencyCalibrator.set_busy` (the
plan's ``PlanSolution.sharing_k``: what the planner assumed for it). Without a table the
factor is the plain ratio, as before.

:meth:`LatencyCalibrator.drift` says how far the factors have moved from those of the
profile in use; the planning policy re-plans when that passes ``margin`` (hysteresis: a
new compiled problem costs a solve, and noise must not re-plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from services.planner.profile import LatencyPoint, PipelineProfile, TaskProfile
from services.planner.sharing import factor as sharing_factor

DEFAULT_MIN_BATCHES = 10     # batches before a variant's own factor is trusted
DEFAULT_ALPHA = 0.03         # weight of one batch in the smoothed ratio (a report of n: 1 - 0.97^n)
DEFAULT_MARGIN = 0.3         # re-plan when a factor moves by more than 30 % (noise on a busy host: ~25 %)
DEFAULT_OUTLIER_K = 4.0      # a batch over 4x (x the profile's p95/p50) its variant's others is a stall


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
    max_ms: float = 0.0        # the slowest of those batches (0: not known)
    busy: float = 0.0          # mean workers busy on the device meanwhile, itself included (0: not known)


@dataclass
class _Track:
    ratio: float | None = None     # smoothed measured / profile p50
    batches: int = 0
    items: int = 0
    regions: int = 0
    start: list = field(default_factory=list)     # (ratio, batches, items, regions) until trusted
    suspect: list = field(default_factory=list)   # slow reports held back once trusted
    stalls: int = 0                               # batches left out as stalls
    stalls_in_start: int = 0                      # of those, in ``start`` (recounted as it grows)


class LatencyCalibrator:
    def __init__(self, profile: PipelineProfile, min_batches: int = DEFAULT_MIN_BATCHES,
                 alpha: float = DEFAULT_ALPHA, margin: float = DEFAULT_MARGIN,
                 outlier_k: float = DEFAULT_OUTLIER_K) -> None:
        self.base = profile
        self.min_batches = min_batches
        self.alpha = alpha
        self.margin = margin
        self.outlier_k = outlier_k
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._variants = {(t.name, v.name): v for t in profile.tasks for v in t.variants}
        self._share = {key: profile.sharing.get(v.device or profile.device) for key, v in self._variants.items()}
        self.busy = 1.0            # load of the plan in force, for reports that do not say (set_busy)
        self.in_use: dict[tuple[str, str], float] = {}   # factors of the profile last planned on

    def observe(self, timings: Iterable[Timing]) -> None:
        for t in timings:
            v = self._variants.get((t.task, t.variant))
            if v is None or t.count <= 0 or t.total_ms <= 0:
                continue
            known = sorted(v.latency_ms)
            size = next((b for b in known if b >= t.batch_size), known[-1])
            point = v.latency_ms[size]
            expected = point.p50_ms
            if size != t.batch_size:   # a partial batch: scale the next profiled size linearly
                expected *= t.batch_size / size
            table = self._share[(t.task, t.variant)]
            if table is not None:      # against the profile at the load it ran under
                expected *= sharing_factor(table, t.busy if t.busy > 0 else self.busy)
            limit = self.outlier_k * max(1.0, point.p95_ms / point.p50_ms if point.p50_ms > 0 else 1.0)
            tr = self._tracks.setdefault((t.task, t.variant), _Track())
            count, total = t.count, t.total_ms
            if count > 1 and 0 < t.max_ms <= total and t.max_ms > limit * (total - t.max_ms) / (count - 1):
                count, total = count - 1, total - t.max_ms     # its slowest batch was a stall
                tr.stalls += 1
            report = (total / count / expected, count, t.items, t.regions)
            if tr.batches < self.min_batches:
                tr.start.append(report)
                self._restart(tr, limit)
            elif report[0] > limit * tr.ratio:
                tr.suspect.append(report)          # a stall, unless the next batches are as slow
                if sum(r[1] for r in tr.suspect) >= self.min_batches:
                    tr.start, tr.suspect = tr.suspect, []
                    self._restart(tr, limit)       # the host did slow down: start again from these
            else:
                tr.stalls += sum(r[1] for r in tr.suspect)
                tr.suspect = []
                self._absorb(tr, report)

    def _absorb(self, tr: _Track, report: tuple[float, int, int, int]) -> None:
        ratio, count, items, regions = report
        # one report of n batches weighs like n single observations; until the
        # smoothing has seen ~1/alpha batches it is a plain mean (no bias to the first)
        w = max(count / (tr.batches + count), 1.0 - (1.0 - self.alpha) ** count)
        tr.ratio = ratio if tr.ratio is None else tr.ratio + w * (ratio - tr.ratio)
        tr.batches += count
        tr.items += items
        tr.regions += regions

    def _restart(self, tr: _Track, limit: float) -> None:
        """The track from its first reports, leaving out those over ``limit`` x their
        batch-weighted median (stalls among the first batches)."""
        median = weighted_median([(r[0], r[1]) for r in tr.start])
        kept = [r for r in tr.start if r[0] <= limit * median]
        tr.stalls += sum(r[1] for r in tr.start) - sum(r[1] for r in kept) - tr.stalls_in_start
        tr.stalls_in_start = sum(r[1] for r in tr.start) - sum(r[1] for r in kept)
        tr.ratio, tr.batches, tr.items, tr.regions = None, 0, 0, 0
        for r in kept:
            self._absorb(tr, r)
        if tr.batches >= self.min_batches:
            tr.start, tr.stalls_in_start = [], 0

    def set_busy(self, k: float) -> None:
        """The busy workers per device the plan in force implies (its solution's
        ``sharing_k``): the load of reports that do not carry their own ``busy``."""
        if not (isinstance(k, (int, float)) and k >= 1):
            raise ValueError(f"busy workers must be a number >= 1, got {k!r}")
        self.busy = float(k)

    def stalls(self) -> dict[tuple[str, str], int]:
        """Batches left out as stalls, per ``(task, variant)``."""
        return {k: tr.stalls for k, tr in self._tracks.items() if tr.stalls}

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


def weighted_median(values: Iterable[tuple[float, float]]) -> float:
    """The median of ``(value, weight)`` pairs (the lower one on a tie)."""
    pairs = sorted(values)
    half = sum(w for _, w in pairs) / 2.0
    acc = 0.0
    for x, w in pairs:
        acc += w
        if acc >= half:
            return x
    return pairs[-1][0]


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
