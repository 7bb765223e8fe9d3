"""MostAccurateFirst: the routing policy of every stage, as pure code.

The plan gives each worker of a stage a weight per upstream variant path: its planned
share of that path's queries. MostAccurateFirst reads those shares as capacities and
fills them in accuracy order: the most accurate workers take traffic up to their
planned share, the rest spills down the accuracy ladder; workers of equally accurate
variants share their class's traffic in proportion to their planned shares. With the demand the plan was
made for (``load_ratio == 1``) it routes exactly the planned split; with less demand the
least accurate workers lose traffic first (accuracy goes up, never down); with more
demand than planned every worker is full and the excess is spread in proportion to the
planned shares (every worker overloaded by the same factor, none singled out).

Used by the simulator and usable by the router: the choice is a function of the
weights, the workers' accuracies, the load ratio and a uniform number ``u`` in [0, 1),
so it is deterministic for a seeded ``u``.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, TypeVar

from services.policy.rates import RATE_TAU_S, RateMeter

K = TypeVar("K", bound=Hashable)


def most_accurate_first(weights: Mapping[str, float], accuracy: Mapping[str, float],
                        load_ratio: float = 1.0) -> dict[str, float]:
    """Effective routing weights (summing to 1) for ``load_ratio`` = observed rate /
    planned rate of this (stage, upstream path). Workers are ordered by accuracy,
    highest first (ties by worker id, so the result is deterministic); zero and
    negative weights never receive traffic. Raises ValueError when no weight is positive."""
    items = sorted(((wid, w) for wid, w in weights.items() if w > 0),
                   key=lambda kv: (-accuracy.get(kv[0], 0.0), kv[0]))
    total = sum(w for _, w in items)
    if total <= 0:
        raise ValueError("no positive weight")
    if not (load_ratio > 0):   # no observed traffic (or NaN): the plan's own split
        load_ratio = 1.0
    # Fill accuracy classes (workers of equally accurate variants), most accurate first.
    # Within a class traffic is split in proportion to the planned shares: packing it onto
    # the first workers of a class would gain no accuracy and spend their headroom.
    classes: dict[float, list[tuple[str, float]]] = {}
    for wid, w in items:
        classes.setdefault(accuracy.get(wid, 0.0), []).append((wid, w))
    remaining = load_ratio
    out: dict[str, float] = {}
    for members in classes.values():      # insertion order = accuracy order
        share = sum(w for _, w in members) / total
        take = min(share, remaining)
        for wid, w in members:
            out[wid] = take * w / (share * total)
        remaining -= take
        if remaining <= 0:
            break
    if remaining > 1e-12:   # more than planned: spread the excess by planned share
        for wid, w in items:
            out[wid] = out.get(wid, 0.0) + remaining * w / total
    s = sum(out.values())
    return {wid: x / s for wid, x in out.items() if x > 0}


@dataclass(frozen=True)
class RouteTable:
    """A compiled choice over workers: ``choose(u)`` returns the worker whose cumulative
    weight interval holds ``u`` (workers in accuracy order, most accurate first)."""

    ids: tuple[str, ...]
    cum: tuple[float, ...]      # cumulative weights, last == 1.0

    @staticmethod
    def build(weights: Mapping[str, float], accuracy: Mapping[str, float],
              load_ratio: float = 1.0) -> "RouteTable":
        eff = most_accurate_first(weights, accuracy, load_ratio)
        ids = tuple(sorted(eff, key=lambda k: (-accuracy.get(k, 0.0), k)))
        acc, cum = 0.0, []
        for k in ids:
            acc += eff[k]
            cum.append(acc)
        cum[-1] = 1.0
        return RouteTable(ids, tuple(cum))

    def choose(self, u: float) -> str:
        i = bisect_right(self.cum, u)
        return self.ids[i if i < len(self.ids) else -1]


# The share of its planned capacity a worker is filled to before traffic spills to a
# less accurate one. A plan's shares are capacities at the demand it was planned for,
# where a worker's batches run back to back; filling the most accurate workers that
# full at lower demand leaves them no slack for bursts (a detector batch releases ~50
# classifier sub-queries at once). Measured in the simulator (docs/results, traffic
# analysis, steady Poisson): fill 1.0 -> 4.2 % violations at 193 req/s, 0.7 -> 0.1 %.
DEFAULT_FILL = 0.7


class MostAccurateFirstPolicy:
    """Routing policy for one stage: the plan's weights for an upstream path, the
    workers' accuracies, and the current load ratio, in; one worker id out.

    ``fill`` (0 < fill <= 1) caps the utilisation MostAccurateFirst packs a worker to:
    the policy routes as :func:`most_accurate_first` does for capacities of
    ``fill`` times the planned shares (``load_ratio / fill``)."""

    def __init__(self, accuracy: Mapping[str, float], fill: float = DEFAULT_FILL) -> None:
        if not 0 < fill <= 1:
            raise ValueError(f"fill must be in (0, 1], got {fill!r}")
        self.accuracy = dict(accuracy)
        self.fill = float(fill)
        self._cache: dict[tuple, RouteTable] = {}

    def table(self, weights: Mapping[str, float], load_ratio: float = 1.0) -> RouteTable:
        if load_ratio > 0:            # NaN and 0 keep meaning "no observation"
            load_ratio = load_ratio / self.fill
        key = (tuple(sorted(weights.items())), round(load_ratio, 3))
        t = self._cache.get(key)
        if t is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            t = self._cache[key] = RouteTable.build(weights, self.accuracy, load_ratio)
        return t

    def choose(self, weights: Mapping[str, float], u: float, load_ratio: float = 1.0) -> str:
        return self.table(weights, load_ratio).choose(u)


def pick_weighted(weights: Mapping[str, float], u: float) -> str:
    """Choose a key with probability proportional to its weight given ``u`` in [0, 1)
    (zero and negative weights never chosen; ValueError when none is positive)."""
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        raise ValueError("no positive weight")
    acc = 0.0
    target = u * total
    last = None
    for key, w in weights.items():
        if w <= 0:
            continue
        acc += w
        last = key
        if target < acc:
            return key
    return last  # type: ignore[return-value]


def expected_finish_s(start_s: float, waiting: int, max_batch: int, batch_s: float) -> float:
    """When a worker that can start at ``start_s`` has run ``waiting`` queries, in whole
    batches of ``max_batch`` that take ``batch_s`` each."""
    return start_s + -(-waiting // max(1, max_batch)) * batch_s


# Rerouting moves a group whose chosen worker would leave it less than this fraction of
# the SLO as slack. The reserve is a lower bound on the stages below (their fastest single
# query) and batch times vary, so "just in time" by the estimate is often late. Measured in
# the simulator (traffic analysis, comparison traces, high / low load): slack 0 -> 4.8 / 1.9 %
# violations, 0.1 -> 4.3 / 1.5 %, 0.2 -> 3.4 / 1.1 %, 0.3 -> 3.2 / 1.1 %, 0.4 -> 3.3 / 1.2 %.
REROUTE_SLACK = 0.2


def reroute_choice(chosen: K, finish_s: Mapping[K, float], deadline_s: float, reserve_s: float,
                   slack_s: float = 0.0) -> K:
    """Opportunistic rerouting (brief section 3): keep ``chosen`` if it finishes the
    queries by ``deadline_s - reserve_s - slack_s`` (``reserve_s``: what the stages below
    still need); else take the worker of the stage (any variant) that finishes them first,
    if that one makes ``deadline_s - reserve_s``. Otherwise keep ``chosen``, whose worker
    drops them early. ``finish_s`` holds each candidate's expected finish (ties: the first
    listed wins); a chosen worker with no estimate is kept."""
    mine = finish_s.get(chosen)
    if mine is None or mine + reserve_s + slack_s <= deadline_s or not finish_s:
        return chosen
    best = min(finish_s, key=finish_s.__getitem__)
    return best if finish_s[best] + reserve_s <= deadline_s else chosen


class StageRouting:
    """The routing decision of one stage under one plan, as the router and the
    simulator both make it: MostAccurateFirst over the plan's weights for the query's
    upstream path, at the load ratio (measured rate / planned rate) of that path.

    Rates are measured per routing key: the upstream path when the plan states a rate
    for it, else ``ANY_PATH``. The caller counts every routed query (``split`` does it)
    and calls ``advance(now)`` before routing; tables are compiled once per rate tick.
    ``u`` is the caller's source of uniform numbers in [0, 1) (seeded in the simulator).
    """

    def __init__(self, task: str, fill: float = DEFAULT_FILL, tau_s: float | None = None) -> None:
        self.task = task
        self.fill = fill
        self.meter = RateMeter(RATE_TAU_S if tau_s is None else tau_s)
        self._maf = MostAccurateFirstPolicy({}, fill)
        self._weights: Mapping[str, Mapping[str, float]] = {}
        self._planned: Mapping[str, float] = {}
        self._tables: dict[str, RouteTable | None] = {}

    def set_plan(self, routing: Mapping[str, Mapping[str, float]], planned_qps: Mapping[str, float],
                 accuracy: Mapping[str, float]) -> None:
        """``routing``: upstream path -> worker -> weight (this stage's table of the plan);
        ``planned_qps``: upstream path -> planned query rate; ``accuracy``: worker ->
        its variant's accuracy."""
        self._weights = routing
        self._planned = planned_qps
        self._maf = MostAccurateFirstPolicy(accuracy, self.fill)
        self._tables = {}

    def key(self, path: str) -> str:
        return path if path in self._planned else "*"

    def advance(self, now: float) -> None:
        if self.meter.advance(now):
            self._tables = {}

    def load_ratio(self, path: str) -> float:
        key = self.key(path)
        target, seen = self._planned.get(key), self.meter.rate(key)
        if not target or seen is None:
            return 1.0
        return seen / target

    def table(self, path: str) -> RouteTable | None:
        """The compiled choice for ``path`` (None when the plan routes nothing for it)."""
        if path in self._tables:
            return self._tables[path]
        weights = self._weights.get(path) or self._weights.get("*") or self._any_path()
        t = self._maf.table(weights, self.load_ratio(path)) if weights else None
        self._tables[path] = t
        return t

    def _any_path(self) -> dict[str, float]:
        """Weights for an upstream path the plan did not foresee (a batch an upstream
        worker ran on its burst variant): every worker of the stage, in proportion to its
        planned share over all paths."""
        merged: dict[str, float] = {}
        for table in self._weights.values():
            for wid, x in table.items():
                merged[wid] = merged.get(wid, 0.0) + x
        return merged

    def split(self, path: str, k: int, u: Callable[[], float]) -> dict[str, int]:
        """Choose a worker for each of ``k`` queries of ``path``: ``{worker: count}`` in
        first-chosen order (empty when the plan routes nothing for the path)."""
        t = self.table(path)
        if t is None:
            return {}
        self.meter.count(self.key(path), k)
        ids = t.ids
        if len(ids) == 1:
            return {ids[0]: k}
        out: dict[str, int] = {}
        cum, last = t.cum, len(ids) - 1
        for _ in range(k):          # RouteTable.choose, inlined: the simulator's inner loop
            i = bisect_right(cum, u())
            w = ids[i if i <= last else last]
            out[w] = out.get(w, 0) + 1
        return out
