"""Per-request outcomes and the load report: pure arithmetic, no I/O.

Every request the load generator schedules ends in exactly one :class:`RequestResult`
whose ``code`` is a gRPC status name (``OK``, ``DEADLINE_EXCEEDED``, ...) or one of the
client-side codes below. :func:`summarize` turns the results into a :class:`LoadReport`:

* answered OK = ``code == OK``; of those, *late* = latency > the request's SLO;
* dropped = DEADLINE_EXCEEDED, shed = RESOURCE_EXHAUSTED, invalid = INVALID_ARGUMENT,
  errors = every other code (client-side ones included);
* ``sent == ok + dropped + shed + invalid + sum(errors)`` always holds;
* SLO violation ratio = (late + dropped + shed + invalid + errors) / sent
  = (sent - on_time) / sent, counted per request end to end (design brief, section 5);
* ``failure_reasons`` says why requests failed: every request not answered OK counted
  under ``"<status>: <message>"``, messages that differ only in their numbers grouped
  together (one of them shown), most frequent first.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

# Client-side outcome codes (never sent by a server).
IN_FLIGHT_CAP = "CLIENT_IN_FLIGHT_CAP"      # refused locally: too many requests in flight
BAD_RESPONSE = "CLIENT_BAD_RESPONSE"        # status OK but the tensors did not parse
CLIENT_ERROR = "CLIENT_ERROR"               # an exception in the client itself
NOT_FINISHED = "CLIENT_NOT_FINISHED"        # still pending at the run's hard stop

# What a client-side outcome means, for the failure reasons (it has no server message).
CLIENT_MESSAGES = {
    IN_FLIGHT_CAP: "not sent: --max-in-flight requests were outstanding",
    BAD_RESPONSE: "status OK but the answer's tensors did not parse",
    CLIENT_ERROR: "the load generator's client failed",
    NOT_FINISHED: "no answer by the run's hard stop (cancelled)",
}
FAILURE_GROUPS_SHOWN = 8

OK = "OK"
DROPPED = "DEADLINE_EXCEEDED"
SHED = "RESOURCE_EXHAUSTED"
INVALID = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class RequestResult:
    """The one terminal outcome of one scheduled request.

    ``latency_s`` is measured from the request's *scheduled* send time (``t_s``), so a
    send the generator made late counts its lag against the SLO (``send_lag_s`` says how
    late it went out); None when it never got an answer or status (refused by the
    in-flight cap, cancelled at the hard stop). ``cer`` is the page's character error
    rate against ground truth (OK answers only, when truth is known); ``orientation_acc``
    the share of its ground-truth lines whose orientation the answer reads right (OK answers
    of a pipeline with a line orientation classifier, pipelines/ocr_tree.yaml, only)."""

    index: int
    code: str
    latency_s: float | None
    slo_s: float
    cer: float | None = None
    plan_version: int | None = None
    variant_path: str | None = None
    t_s: float | None = None        # its scheduled send time, seconds from the run's start
    message: str = ""               # the status details of a failure, as the client saw them
    send_lag_s: float | None = None  # actual send time - scheduled time (None: never sent)
    orientation_acc: float | None = None

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
    failure_reasons: dict[str, int] = field(default_factory=dict)   # "<status>: <message>" -> count
    # samples of the plan in force during the run (services/loadgen/plan_history.py), in order
    plan_history: tuple[dict, ...] = field(default=(), repr=False)
    send_lag_p50_ms: float | None = None   # how late requests went out vs their schedule
    send_lag_p99_ms: float | None = None
    mean_orientation_acc: float | None = None   # mean over answered pages (OCR tree only)
    orientation_pages: int = 0

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def violations(self) -> int:
        return self.late + self.dropped + self.shed + self.invalid + self.total_errors

    def to_dict(self) -> dict:
        """The summary and the plan history (per-request results are left out: see
        ``records``)."""
        d = asdict(replace(self, results=()))
        del d["results"]
        d["plan_history"] = list(self.plan_history)
        d["total_errors"] = self.total_errors
        d["violations"] = self.violations
        return d

    @property
    def records(self) -> list[dict]:
        """One flat record per request (see :func:`request_record`), in schedule order."""
        return [request_record(r) for r in self.results]


RECORD_FIELDS = ("index", "scheduled_s", "sent_s", "send_lag_ms", "outcome", "ok", "on_time",
                 "latency_ms", "slo_ms", "plan_version", "variant_path", "cer", "message")


def request_record(r: RequestResult) -> dict:
    """A request as a flat, JSON-able record (the ``--records`` file's lines):
    ``scheduled_s`` / ``sent_s`` seconds from the run's start (``sent_s`` None when never
    sent), ``outcome`` the status code, ``latency_ms`` from the scheduled time,
    ``cer`` the answer's error rate against ground truth (None: unknown)."""
    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 3)

    sent = None if r.t_s is None or r.send_lag_s is None else round(r.t_s + r.send_lag_s, 6)
    return {
        "index": r.index, "scheduled_s": None if r.t_s is None else round(r.t_s, 6),
        "sent_s": sent, "send_lag_ms": ms(r.send_lag_s), "outcome": r.code, "ok": r.ok,
        "on_time": r.on_time, "latency_ms": ms(r.latency_s), "slo_ms": ms(r.slo_s),
        "plan_version": r.plan_version, "variant_path": r.variant_path, "cer": r.cer,
        "message": r.message,
    }


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    """``q``-th percentile (numpy's linear interpolation) in milliseconds."""
    if not latencies_s:
        return None
    return float(np.percentile(np.asarray(latencies_s, dtype=float), q)) * 1000.0


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def failure_reasons(results: Iterable[RequestResult]) -> dict[str, int]:
    """Why requests failed: ``"<status>: <message>" -> count`` over the requests not
    answered OK, most frequent first. Messages equal but for their numbers ("... 12 ms
    ...", "... 15 ms ...") form one group, shown with the first message seen."""
    counts: Counter = Counter()
    shown: dict[tuple[str, str], str] = {}
    for r in results:
        if r.ok:
            continue
        message = r.message or CLIENT_MESSAGES.get(r.code, "")
        key = (r.code, _NUMBER.sub("#", message))
        shown.setdefault(key, f"{r.code}: {message}" if message else r.code)
        counts[key] += 1
    return {shown[k]: n for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def summarize(results: Iterable[RequestResult], *, elapsed_s: float, window_s: float = 0.0,
              max_send_lag_s: float = 0.0, config: dict | None = None,
              plan_history: Sequence[dict] = ()) -> LoadReport:
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
    orient = [r.orientation_acc for r in ok_results if r.orientation_acc is not None]
    paths = Counter(r.variant_path for r in ok_results if r.variant_path is not None)
    versions = Counter(str(r.plan_version) for r in ok_results if r.plan_version is not None)
    per_s = window_s if window_s > 0 else elapsed_s
    lags = [r.send_lag_s for r in results if r.send_lag_s is not None]
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
        # the sending loop's worst lag and the worst a request saw when it actually went out
        max_send_lag_ms=max([max_send_lag_s, *lags]) * 1000.0,
        config=dict(config or {}),
        results=tuple(sorted(results, key=lambda r: r.index)),
        failure_reasons=failure_reasons(results),
        plan_history=tuple(plan_history),
        send_lag_p50_ms=percentile_ms(lags, 50),
        send_lag_p99_ms=percentile_ms(lags, 99),
        mean_orientation_acc=float(np.mean(orient)) if orient else None,
        orientation_pages=len(orient),
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
        ("send lag p50 / p99 / max", " / ".join(
            _fmt(v, " ms") for v in (report.send_lag_p50_ms, report.send_lag_p99_ms,
                                     report.max_send_lag_ms))),
        ("mean CER (answered pages)", (f"{report.mean_cer:.4f} over {report.cer_pages} pages"
                                       if report.mean_cer is not None else "-")),
    ]
    if report.mean_orientation_acc is not None:
        rows.append(("line orientation accuracy", f"{report.mean_orientation_acc:.4f} over "
                                                  f"{report.orientation_pages} pages"))
    if report.plan_history:
        good = [x for x in report.plan_history if "error" not in x]
        versions = sorted({x.get("version") for x in good if x.get("version") is not None})
        workers = [x.get("active_workers", 0) for x in good]
        rows.append(("plan samples", f"{len(report.plan_history)}"
                     + (f" (versions {versions[0]}..{versions[-1]}, active workers "
                        f"{min(workers)}..{max(workers)})" if versions else "")
                     + (f", {len(report.plan_history) - len(good)} unreadable"
                        if len(good) < len(report.plan_history) else "")))
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
    if report.failure_reasons:
        lines.append("why requests failed (status: message):")
        groups = list(report.failure_reasons.items())
        for reason, n in groups[:FAILURE_GROUPS_SHOWN]:
            lines.append(f"  {share(n)}  {reason}")
        rest = groups[FAILURE_GROUPS_SHOWN:]
        if rest:
            lines.append(f"  {share(sum(n for _, n in rest))}  ({len(rest)} other reasons; all in the JSON report)")
    return "\n".join(lines)
