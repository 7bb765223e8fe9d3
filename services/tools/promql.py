"""A small PromQL evaluator over scraped samples: the subset the Grafana dashboard
(deploy/grafana/dashboards/pipeserve.json) uses, so that its panels can be drawn from the
services' own scrapes where no Prometheus server runs (``services.tools.dashboard_figure``)
and so that a test can check that every dashboard query parses.

Supported: selectors with ``=``, ``!=``, ``=~``, ``!~`` matchers and a range ``[5s]``;
``rate`` and ``increase``; ``sum``/``avg``/``min``/``max``/``count`` with ``by``/``without``;
``histogram_quantile``; ``clamp_min``; the binary operators ``+ - * /`` between vectors with
the same labels, or a vector and a number; number literals. Anything else is refused with
:class:`PromQLError` naming what and where.

Semantics follow Prometheus with two simplifications: ``rate`` is the increase between the
first and last samples in the window divided by their time distance (counter resets
handled, no extrapolation to the window's edges), and an instant selector takes a series'
last sample at most ``lookback_s`` old (Prometheus: 5 minutes, and staleness markers).
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

Labels = frozenset  # of (name, value) pairs, without __name__


class PromQLError(ValueError):
    pass


# -- the store -----------------------------------------------------------------------------
@dataclass
class SeriesStore:
    """Samples by series: ``(metric name, labels) -> ([t], [v])``, appended in time order."""

    series: dict[tuple[str, Labels], tuple[list[float], list[float]]] = field(default_factory=dict)

    def add(self, t: float, name: str, labels: Mapping[str, str], value: float) -> None:
        key = (name, frozenset(labels.items()))
        ts, vs = self.series.setdefault(key, ([], []))
        ts.append(t)
        vs.append(value)

    def add_exposition(self, t: float, text: str, extra_labels: Mapping[str, str] | None = None) -> None:
        """Every sample of a Prometheus text exposition, taken at time ``t``."""
        from prometheus_client.parser import text_string_to_metric_families

        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.add(t, s.name, {**s.labels, **(extra_labels or {})}, s.value)

    def select(self, name: str, matchers: list["Matcher"]) -> Iterable[tuple[Labels, list[float], list[float]]]:
        for (n, labels), (ts, vs) in self.series.items():
            if n == name:
                d = dict(labels)
                if all(m.matches(d.get(m.label, "")) for m in matchers):
                    yield labels, ts, vs


# -- the syntax tree ---------------------------------------------------------------------
@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def matches(self, v: str) -> bool:
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        full = re.fullmatch(self.value, v) is not None
        return full if self.op == "=~" else not full


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...]
    range_s: float | None = None


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple


@dataclass(frozen=True)
class Aggregate:
    op: str
    expr: object
    by: tuple[str, ...] | None = None
    without: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Binary:
    op: str
    left: object
    right: object


AGGREGATIONS = {"sum", "avg", "min", "max", "count"}
FUNCTIONS = {"rate": 1, "increase": 1, "histogram_quantile": 2, "clamp_min": 2}
_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?P<unit>ms|s|m|h|d)?
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<op>=~|!~|!=|==|[=(){}\[\],+\-*/])
  | (?P<var>\$\w+)
)""", re.X)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"unexpected {text[pos:pos + 10]!r} at {pos} in {text!r}")
        if m.group("num") is not None:
            kind, val = ("dur" if m.group("unit") else "num"), m.group("num") + (m.group("unit") or "")
        elif m.group("name") is not None:
            kind, val = "name", m.group("name")
        elif m.group("str") is not None:
            kind, val = "str", m.group("str")[1:-1].encode().decode("unicode_escape")
        elif m.group("var") is not None:
            raise PromQLError(f"unresolved variable {m.group('var')} in {text!r} (substitute it first)")
        else:
            kind, val = "op", m.group("op")
        out.append((kind, val, m.start()))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, k: int = 0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "", len(self.text))

    def take(self, kind: str | None = None, val: str | None = None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (val and tok[1] != val):
            want = val or kind
            raise PromQLError(f"expected {want!r} at {tok[2]}, got {tok[1] or 'the end'!r} in {self.text!r}")
        self.i += 1
        return tok

    def parse(self):
        e = self.expr()
        if self.peek()[0] != "eof":
            raise PromQLError(f"unexpected {self.peek()[1]!r} at {self.peek()[2]} in {self.text!r}")
        return e

    def expr(self):
        left = self.term()
        while self.peek()[0] == "op" and self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            left = Binary(op, left, self.term())
        return left

    def term(self):
        left = self.atom()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            left = Binary(op, left, self.atom())
        return left

    def labels(self) -> tuple[str, ...]:
        self.take("op", "(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take("name")[1])
            if self.peek()[1] == ",":
                self.take()
        self.take("op", ")")
        return tuple(names)

    def atom(self):
        kind, val, pos = self.peek()
        if kind == "num":
            self.take()
            return Number(float(val))
        if kind == "op" and val == "(":
            self.take()
            e = self.expr()
            self.take("op", ")")
            return e
        if kind == "op" and val == "-":
            self.take()
            return Binary("*", Number(-1.0), self.atom())
        if kind != "name":
            raise PromQLError(f"unexpected {val or 'end'!r} at {pos} in {self.text!r}")
        if val in AGGREGATIONS and self.peek(1)[1] in ("(", "by", "without"):
            self.take()
            by = without = None
            if self.peek()[1] in ("by", "without"):
                which = self.take()[1]
                by, without = (self.labels(), None) if which == "by" else (None, self.labels())
            self.take("op", "(")
            inner = self.expr()
            self.take("op", ")")
            if self.peek()[1] in ("by", "without") and by is None and without is None:
                which = self.take()[1]
                by, without = (self.labels(), None) if which == "by" else (None, self.labels())
            return Aggregate(val, inner, by, without)
        if self.peek(1)[1] == "(":
            if val not in FUNCTIONS:
                raise PromQLError(f"function {val!r} is not supported (at {pos} in {self.text!r})")
            self.take()
            self.take("op", "(")
            args = [self.expr()]
            while self.peek()[1] == ",":
                self.take()
                args.append(self.expr())
            self.take("op", ")")
            if len(args) != FUNCTIONS[val]:
                raise PromQLError(f"{val} takes {FUNCTIONS[val]} arguments, got {len(args)} in {self.text!r}")
            if val in ("rate", "increase") and not (isinstance(args[0], Selector) and args[0].range_s):
                raise PromQLError(f"{val} needs a range selector like m[5s] in {self.text!r}")
            return Call(val, tuple(args))
        return self.selector()

    def selector(self) -> Selector:
        name = self.take("name")[1]
        matchers = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label = self.take("name")[1]
                op = self.take("op")[1]
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r} in {self.text!r}")
                matchers.append(Matcher(label, op, self.take("str")[1]))
                if self.peek()[1] == ",":
                    self.take()
            self.take("op", "}")
        range_s = None
        if self.peek()[1] == "[":
            self.take()
            dur = self.take("dur")[1]
            unit = re.search(r"[a-z]+$", dur).group(0)
            range_s = float(dur[:-len(unit)]) * _UNITS[unit]
            self.take("op", "]")
        return Selector(name, tuple(matchers), range_s)


def parse(text: str):
    """The syntax tree of ``text``; :class:`PromQLError` for anything outside the subset."""
    return _Parser(text).parse()


def metric_names_in(node) -> set[str]:
    """The metric names a query selects."""
    if isinstance(node, Selector):
        return {node.name}
    if isinstance(node, Call):
        return set().union(*(metric_names_in(a) for a in node.args))
    if isinstance(node, Aggregate):
        return metric_names_in(node.expr)
    if isinstance(node, Binary):
        return metric_names_in(node.left) | metric_names_in(node.right)
    return set()


# -- evaluation ------------------------------------------------------------------------------
Vector = dict  # Labels -> float


def _rate(ts: list[float], vs: list[float], t: float, window: float, per_second: bool) -> float | None:
    lo = bisect.bisect_right(ts, t - window)
    hi = bisect.bisect_right(ts, t)
    if hi - lo < 2:
        return None
    inc = 0.0
    for a, b in zip(vs[lo:hi - 1], vs[lo + 1:hi]):
        inc += b - a if b >= a else b     # a counter reset: it started again from 0
    return inc / (ts[hi - 1] - ts[lo]) if per_second else inc


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's bucketQuantile: linear interpolation within the bucket holding rank q."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    i = next(k for k, (_, c) in enumerate(buckets) if c >= rank)
    if i == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[i]
    lower, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
    if i == 0 and upper <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper


def evaluate(node, store: SeriesStore, t: float, lookback_s: float = 300.0):
    """Evaluate at time ``t``: a float for a number, else a vector ``{labels: value}``."""
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Selector):
        if node.range_s is not None:
            raise PromQLError(f"a range selector {node.name}[...] needs rate() or increase()")
        out: Vector = {}
        for labels, ts, vs in store.select(node.name, list(node.matchers)):
            i = bisect.bisect_right(ts, t) - 1
            if i >= 0 and t - ts[i] <= lookback_s:
                out[labels] = vs[i]
        return out
    if isinstance(node, Call):
        if node.func in ("rate", "increase"):
            sel = node.args[0]
            out = {}
            for labels, ts, vs in store.select(sel.name, list(sel.matchers)):
                r = _rate(ts, vs, t, sel.range_s, node.func == "rate")
                if r is not None:
                    out[labels] = r
            return out
        if node.func == "histogram_quantile":
            q = evaluate(node.args[0], store, t, lookback_s)
            vec = evaluate(node.args[1], store, t, lookback_s)
            groups: dict[Labels, list[tuple[float, float]]] = {}
            for labels, v in vec.items():
                d = dict(labels)
                le = d.pop("le", None)
                if le is None:
                    continue
                groups.setdefault(frozenset(d.items()), []).append((float(le), v))
            return {k: x for k, b in groups.items() if not math.isnan(x := _quantile(q, b))}
        if node.func == "clamp_min":
            vec = evaluate(node.args[0], store, t, lookback_s)
            floor = evaluate(node.args[1], store, t, lookback_s)
            return {k: max(v, floor) for k, v in vec.items()}
    if isinstance(node, Aggregate):
        vec = evaluate(node.expr, store, t, lookback_s)
        groups: dict[Labels, list[float]] = {}
        for labels, v in vec.items():
            if node.by is not None:
                key = frozenset((k, x) for k, x in labels if k in node.by)
            elif node.without is not None:
                key = frozenset((k, x) for k, x in labels if k not in node.without)
            else:
                key = frozenset()
            groups.setdefault(key, []).append(v)
        fn = {"sum": sum, "min": min, "max": max, "count": len,
              "avg": lambda xs: sum(xs) / len(xs)}[node.op]
        return {k: float(fn(xs)) for k, xs in groups.items()}
    if isinstance(node, Binary):
        a = evaluate(node.left, store, t, lookback_s)
        b = evaluate(node.right, store, t, lookback_s)
        op = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
              "/": lambda x, y: x / y if y != 0 else (math.nan if x == 0 else math.copysign(math.inf, x))}[node.op]
        if isinstance(a, float) and isinstance(b, float):
            return op(a, b)
        if isinstance(a, float):
            return {k: op(a, v) for k, v in b.items()}
        if isinstance(b, float):
            return {k: op(v, b) for k, v in a.items()}
        return {k: op(v, b[k]) for k, v in a.items() if k in b}
    raise PromQLError(f"cannot evaluate {node!r}")


def query_range(text: str, store: SeriesStore, start: float, end: float, step: float
                ) -> dict[Labels, tuple[list[float], list[float]]]:
    """``text`` evaluated every ``step`` seconds from ``start`` to ``end``: per label set,
    its times and values (as Prometheus's ``/api/v1/query_range``)."""
    node = parse(text)
    out: dict[Labels, tuple[list[float], list[float]]] = {}
    n = int(math.floor((end - start) / step + 1e-9)) + 1
    for k in range(n):
        t = start + k * step
        v = evaluate(node, store, t)
        if isinstance(v, float):
            v = {frozenset(): v}
        for labels, x in v.items():
            if math.isfinite(x):
                ts, xs = out.setdefault(labels, ([], []))
                ts.append(t)
                xs.append(x)
    return out
