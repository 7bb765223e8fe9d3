"""Per-request outcomes and the load report: pure arithmetic, no I/O.

Every request the load generator schedules ends in exactly one :class:`RequestResult`
whose ``code`` is a gRPC status name (``OK``, ``DEADLINE_EXCEEDED``, ...) or one of the
client-side codes below. :func:`summarize` turns the results into a :class:`LoadReport`:

* answered OK = ``code == OK``; of those, *late* = latency > the request's SLO;
* dropped = DEADLINE_EXCEEDED, shed = RESOURCE_EXHAUSTED, invalid = INVALID_ARGUMENT,
  errors = every other code (client-side ones included);
* ``sent == ok + dropped + shed + invalid + sum(errors)`` always holds;
* SLO violation ratio = (late + dropped + shed + invalid + errors) / sent
  = (sent - on_time) / sent, counted per request end to end (design brief, section 5).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

# Client-side outcome codes (never sent by a server).
IN_FLIGHT_CAP = "CLIENT_IN_FLIGHT_CAP"      # refused locally: too many requests in flight
BAD_RESPONSE = "CLIENT_BAD_RESPONSE"        # status OK but the tensors did not parse
CLIENT_ERROR = "CLIENT_ERROR"               # an exception in the client itself
NOT_FINISHED = "CLIENT_NOT_FINISHED"        # still pending at the run's hard stop

OK = "OK"
DROPPED = "DEADLINE_EXCEEDED"
SHED = "RESOURCE_EXHAUSTED"
INVALID = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class RequestResult:
    """The one terminal outcome of one scheduled request.

    ``latency_s`` is measured from the moment the request was handed to gRPC; None when
    it never was (refused by the in-flight cap). ``cer`` is the page's character error
    rate against ground truth (OK answers only, when truth is known)."""

    index: int
    code: str
    latency_s: float | None
    slo_s: float
    cer: float | None = None
    plan_version: int | None = None
    variant_path: str | None = None
    t_s: float | None = None        # its scheduled send time, seconds from the run's start
    message: str = ""               # the status details of a failure, as the client saw them

    @property
    def ok(self) -> bool:
        return self.code == OK

    @property
    def on_time(self) -> bool:
        return self.ok and self.latency_s is not None and self.latency_s <= self.slo_s


@dataclass(frozen=True)
class LoadReport:
    sent: int
    ok: int
    on_time: int
    late: int
    dropped: int
    shed: int
    invalid: int
    errors: dict[str, int]
    slo_violation_ratio: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    elapsed_s: float
    window_s: float
    throughput_rps: float
    goodput_rps: float
    mean_cer: float | None
    cer_pages: int
    variant_paths: dict[str, int]
    plan_versions: dict[str, int]
    offered_rps: float
    max_send_lag_ms: float
    config: dict = field(default_factory=dict)
    results: tuple[RequestResult, ...] = field(default=(), repr=False)   # one per request, in order

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def violations(self) -> int:
        return self.late + self.dropped + self.shed + self.invalid + self.total_errors

    def to_dict(self) -> dict:
        """The summary (per-request results are left out: see ``results``)."""
        d = asdict(replace(self, results=()))
        del d["results"]
        d["total_errors"] = self.total_errors
        d["violations"] = self.violations
        return d


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    """``q``-th percentile (numpy's linear interpolation) in milliseconds."""
    if not latencies_s:
        return None
    return float(np.percentile(np.asarray(latencies_s, dtype=float), q)) * 1000.0


def summarize(results: Iterable[RequestResult], *, elapsed_s: float, window_s: float = 0.0,
              max_send_lag_s: float = 0.0, config: dict | None = None) -> LoadReport:
    """Count outcomes.

    Rates (offered load, throughput, goodput) are per second of the *arrival window*
    ``window_s`` (the run's duration, or the last scheduled arrival), so that at steady
    state goodput = offered rate x on-time fraction, whatever the tail of timeouts after
    the last send. ``elapsed_s`` (start to last outcome) is reported as is and is the
    fallback denominator when the window is empty (everything sent at once)."""
    results = list(results)
    codes = Counter(r.code for r in results)
    ok_results = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok_results if r.latency_s is not None]
    on_time = sum(1 for r in ok_results if r.on_time)
    sent = len(results)
    errors = {c: n for c, n in sorted(codes.items()) if c not in (OK, DROPPED, SHED, INVALID)}
    cers = [r.cer for r in ok_results if r.cer is not None]
    paths = Counter(r.variant_path for r in ok_results if r.variant_path is not None)
    versions = Counter(str(r.plan_version) for r in ok_results if r.plan_version is not None)
    per_s = window_s if window_s > 0 else elapsed_s
    return LoadReport(
        sent=sent,
        ok=len(ok_results),
        on_time=on_time,
        late=len(ok_results) - on_time,
        dropped=codes[DROPPED],
        shed=codes[SHED],
        invalid=codes[INVALID],
        errors=errors,
        slo_violation_ratio=(sent - on_time) / sent if sent else 0.0,
        latency_p50_ms=percentile_ms(latencies, 50),
        latency_p95_ms=percentile_ms(latencies, 95),
        latency_p99_ms=percentile_ms(latencies, 99),
        elapsed_s=elapsed_s,
        throughput_rps=len(ok_results) / per_s if per_s > 0 else 0.0,
        goodput_rps=on_time / per_s if per_s > 0 else 0.0,
        mean_cer=float(np.mean(cers)) if cers else None,
        cer_pages=len(cers),
        variant_paths=dict(paths.most_common()),
        plan_versions=dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
        offered_rps=sent / per_s if per_s > 0 else 0.0,
        window_s=window_s,
        max_send_lag_ms=max_send_lag_s * 1000.0,
        config=dict(config or {}),
        results=tuple(sorted(results, key=lambda r: r.index)),
    )


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def format_report(report: LoadReport) -> str:
    """A human-readable table (what the CLI prints)."""
    sent = report.sent

    def share(n: int) -> str:
        return f"{n:>8d}  {100.0 * n / sent:6.2f} %" if sent else f"{n:>8d}"

    rows: list[tuple[str, str]] = [
        ("sent", f"{sent:>8d}"),
        ("answered OK", share(report.ok)),
        ("  on time", share(report.on_time)),
        ("  late (over SLO)", share(report.late)),
        ("dropped (DEADLINE_EXCEEDED)", share(report.dropped)),
        ("shed (RESOURCE_EXHAUSTED)", share(report.shed)),
        ("invalid (INVALID_ARGUMENT)", share(report.invalid)),
    ]
    for code, n in report.errors.items():
        rows.append((f"error {code}", share(n)))
    rows += [
        ("SLO violation ratio", f"{report.slo_violation_ratio:8.4f}"),
        ("latency p50 / p95 / p99", " / ".join(
            _fmt(v, " ms") for v in (report.latency_p50_ms, report.latency_p95_ms,
                                     report.latency_p99_ms))),
        ("offered load", _fmt(report.offered_rps, " req/s", 2)),
        ("throughput (OK)", _fmt(report.throughput_rps, " req/s", 2)),
        ("goodput (on time)", _fmt(report.goodput_rps, " req/s", 2)),
        ("arrival window / elapsed", f"{report.window_s:.2f} s / {report.elapsed_s:.2f} s"),
        ("max send lag", _fmt(report.max_send_lag_ms, " ms")),
        ("mean CER (answered pages)", (f"{report.mean_cer:.4f} over {report.cer_pages} pages"
                                       if report.mean_cer is not None else "-")),
    ]
    if report.plan_versions:
        rows.append(("plan versions", ", ".join(
            f"v{v}: {n}" for v, n in report.plan_versions.items())))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if report.variant_paths:
        lines.append("variant paths (OK answers):")
        pw = max(len(p) for p in report.variant_paths)
        for path, n in report.variant_paths.items():
            lines.append(f"  {path:<{pw}}  {share(n)}")
    return "\n".join(lines)
