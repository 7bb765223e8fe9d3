"""``pipeserve-loadgen``: open-loop load against a pipeline's OIP v2 front door.

Thin CLI over :mod:`services.loadgen.runner` (``run_load``) and
:mod:`services.loadgen.report` (``format_report``); see docs/loadgen.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from services.common.grpc_utils import TlsError, add_tls_arguments, tls_from_args
from services.loadgen.report import LoadReport, format_report
from services.loadgen.records import write_plan_history, write_records
from services.loadgen.runner import LoadConfig, run_load
from services.loadgen.senders import SenderError
from services.loadgen.schedule import SHAPES, RateShape

# which of the shape options each shape uses
SHAPE_OPTIONS = {"constant": (), "step": ("peak_rate", "step_at_s"),
                 "square": ("peak_rate", "period_s"), "diurnal": ("peak_rate", "period_s")}

DESCRIPTION = """\
Send open-loop load to a pipeline's front door (the Open Inference Protocol v2 gRPC
service, model name = pipeline name) and report what happened to every request.

Arrivals are either Poisson at --rate requests/s for --duration seconds (seeded with
--seed), Poisson with a rate that follows a synthetic --shape (step, on/off square wave,
diurnal sine; --rate is then the base rate, --peak-rate the high one), or a replay of a
trace file (--trace, lines 'arrival_ms,qos,deadline_ms'), optionally sped up or slowed
down with --time-scale and multiplied with --rate-scale.
Requests are sent at their scheduled times without waiting for replies; each carries a
gRPC deadline (--timeout-ms, default the SLO). Page images (and their ground truth, for
the character error rate) come from a directory written by pipeserve-make-pages.

Every request ends in exactly one outcome: answered OK (on time or late, i.e. over
--slo-ms), dropped (DEADLINE_EXCEEDED), shed (RESOURCE_EXHAUSTED), invalid
(INVALID_ARGUMENT) or another error, counted by status code; requests refused by the
--max-in-flight cap count as errors (CLIENT_IN_FLIGHT_CAP). Latency counts from each
request's scheduled send time (a send the generator made late carries its lag).
When one process falls behind its schedule (a large max send lag), --procs N sends the
same schedule from N processes.
SLO violation ratio = (late + dropped + shed + invalid + errors) / sent.
"""

EPILOG = """\
examples:
  pipeserve-loadgen --target localhost:8001 --pages data/eval --rate 5 --duration 30
  pipeserve-loadgen --target localhost:8001 --pages data/eval \\
      --trace traces/twitter_medium_normal.txt --time-scale 0.2 --rate-scale 0.05 \\
      --json runs/trace.json
  pipeserve-loadgen --target localhost:8001 --pages data/eval --shape square --rate 1 \
      --peak-rate 8 --period-s 60 --duration 180 --controller localhost:50050 \
      --records runs/sq.jsonl --plan-history runs/sq_plans.json --figures runs/sq_fig
  pipeserve-loadgen --target 127.0.0.1:8001 --pages data/eval --rate 5 --duration 30 \\
      --tls-ca certs/ca.pem --tls-cert certs/client.pem --tls-key certs/client.key   # mutual TLS

exit status: 0 when the run completed (whatever the violation ratio), 2 on bad arguments,
1 when the run could not start (e.g. missing pages) or a --procs sender process failed,
130 when interrupted (Ctrl-C: no report).
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeserve-loadgen", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:8001", metavar="HOST:PORT",
                   help="front door address (default: %(default)s)")
    p.add_argument("--pipeline", default="ocr", metavar="NAME",
                   help="pipeline to call; the OIP model name (default: %(default)s)")
    p.add_argument("--pages", type=Path, required=True, metavar="DIR",
                   help="page directory from pipeserve-make-pages (p000.png ... and "
                        "ground_truth.json); pages are sent round-robin")
    arrivals = p.add_argument_group("arrivals (choose --rate or --trace)")
    mode = arrivals.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=_non_negative_float, metavar="R",
                      help="Poisson arrivals at R requests per second (needs --duration); "
                           "with --shape the base rate (0 allowed for step/square/diurnal)")
    mode.add_argument("--trace", type=Path, metavar="FILE",
                      help="replay a trace of 'arrival_ms,qos,deadline_ms' lines")
    arrivals.add_argument("--duration", type=_positive_float, metavar="S",
                          help="seconds of arrivals; required with --rate, truncates a "
                               "(scaled) trace")
    arrivals.add_argument("--seed", type=int, default=0,
                          help="seed of the Poisson arrivals / trace rate scaling "
                               "(default: %(default)s)")
    arrivals.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="F",
                          help="multiply trace arrival times by F; 0.1 replays 10x faster "
                               "(default: %(default)s)")
    arrivals.add_argument("--rate-scale", type=_positive_float, default=1.0, metavar="S",
                          help="multiply the trace's request rate by S (each arrival sent "
                               "floor(S) or ceil(S) times, within 20 ms; default: %(default)s)")
    arrivals.add_argument("--shape", choices=SHAPES, default="constant",
                          help="how the Poisson rate changes over time (with --rate): constant "
                               "(--rate); step (--rate, then --peak-rate from --step-at-s on); "
                               "square (per --period-s: --rate for the first 1 - --duty of it, "
                               "then --peak-rate); diurnal (a sine from --rate at t=0 up to "
                               "--peak-rate at --period-s/2 and back). default: %(default)s")
    arrivals.add_argument("--peak-rate", type=_positive_float, metavar="R",
                          help="the shape's high rate, requests/s (step, square, diurnal)")
    arrivals.add_argument("--period-s", type=_positive_float, metavar="S",
                          help="the shape's period in seconds (square, diurnal)")
    arrivals.add_argument("--step-at-s", type=_non_negative_float, metavar="S",
                          help="when the step shape switches to --peak-rate (seconds)")
    arrivals.add_argument("--duty", type=_positive_float, default=0.5, metavar="F",
                          help="square: fraction of each period at --peak-rate, in (0, 1) "
                               "(default: %(default)s)")
    arrivals.add_argument("--use-trace-deadlines", action="store_true",
                          help="use each trace line's deadline_ms as that request's SLO "
                               "and timeout instead of --slo-ms/--timeout-ms")
    budget = p.add_argument_group("latency budget")
    budget.add_argument("--slo-ms", type=_positive_float, default=1500.0, metavar="MS",
                        help="end-to-end SLO: OK answers slower than this count as late "
                             "(default: %(default)s)")
    budget.add_argument("--timeout-ms", type=_positive_float, metavar="MS",
                        help="gRPC deadline of each request (default: --slo-ms)")
    budget.add_argument("--send-timeout-param", action="store_true",
                        help="also send the timeout as the OIP request parameter 'timeout' "
                             "(int64 milliseconds)")
    out = p.add_argument_group("output")
    out.add_argument("--max-in-flight", type=_positive_int, default=10_000, metavar="N",
                     help="refuse (and count as errors) requests beyond N outstanding "
                          "(default: %(default)s)")
    out.add_argument("--procs", type=_positive_int, default=1, metavar="N",
                     help="send from N processes, each with its own gRPC channel and event "
                          "loop; arrival i goes to process i %% N, all on one clock, so the "
                          "schedule, the report and the records are those of one process. "
                          "Use it when the report's max send lag grows (one process falls "
                          "behind at several hundred to a few thousand small requests/s), "
                          "at most one per free core; --max-in-flight is split between them "
                          "(default: %(default)s)")
    out.add_argument("--json", type=Path, metavar="FILE",
                     help="also write the report as JSON to FILE")
    out.add_argument("--records", type=Path, metavar="FILE",
                     help="write one record per request to FILE: JSON lines, or CSV when FILE "
                          "ends in .csv (scheduled and actual send time, outcome, latency, "
                          "plan version, variant path, CER, failure message)")
    out.add_argument("--plan-history", type=Path, metavar="FILE",
                     help="write the plan samples (needs --controller or --redis-url) to FILE "
                          "as JSON; they are also in the --json report")
    out.add_argument("--figures", type=Path, metavar="DIR",
                     help="draw PNG figures of the run into DIR (python -m "
                          "services.loadgen.figures draws them from files, and compares runs)")
    out.add_argument("--window-s", type=_positive_float, default=1.0, metavar="S",
                     help="window of the figures' time series (default: %(default)s)")
    out.add_argument("--quiet", action="store_true",
                     help="no progress bar (it is also off when stderr is not a terminal)")
    plans = p.add_argument_group("plan history (the plan in force, sampled during the run)")
    plans.add_argument("--controller", metavar="HOST:PORT",
                       help="ask this controller (ClusterStatus, else GetPlan) every "
                            "--plan-interval-s; gives parked and missing workers too")
    plans.add_argument("--redis-url", metavar="URL",
                       help="read the plan from Redis (pipeserve:<pipeline>:plan); the "
                            "fallback when --controller is also given")
    plans.add_argument("--plan-interval-s", type=_positive_float, default=1.0, metavar="S",
                       help="seconds between plan samples (default: %(default)s)")
    add_tls_arguments(p, client_only=True)
    return p


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def shape_from_args(args: argparse.Namespace) -> RateShape | None:
    """The --shape options as a RateShape (None for a constant rate or a trace)."""
    if args.shape == "constant":
        return None
    return RateShape(args.shape, rate=args.rate, peak_rate=args.peak_rate,
                     period_s=args.period_s, step_at_s=args.step_at_s, duty=args.duty)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    shape = shape_from_args(args)
    return LoadConfig(
        target=args.target, pipeline=args.pipeline, pages_dir=args.pages,
        rate=args.rate if shape is None else None, shape=shape,
        duration_s=args.duration, trace=args.trace,
        controller=args.controller, redis_url=args.redis_url,
        plan_interval_s=args.plan_interval_s,
        time_scale=args.time_scale, rate_scale=args.rate_scale,
        use_trace_deadlines=args.use_trace_deadlines, seed=args.seed,
        slo_ms=args.slo_ms, timeout_ms=args.timeout_ms,
        send_timeout_param=args.send_timeout_param, max_in_flight=args.max_in_flight,
        procs=args.procs,
        progress=not args.quiet,
        tls=tls_from_args(args) if hasattr(args, "tls_ca") else None)


def write_json(report: LoadReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rate is not None and args.duration is None:
        parser.error("--rate needs --duration")
    if args.trace is not None and args.shape != "constant":
        parser.error("--shape needs --rate (the base rate), not --trace")
    if args.shape == "constant" and args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0 (0 is only for a step, square or diurnal --shape)")
    unused = [f"--{name.replace('_', '-')}" for name in ("peak_rate", "period_s", "step_at_s")
              if getattr(args, name) is not None
              and name not in SHAPE_OPTIONS.get(args.shape, ())]
    if unused:
        parser.error(f"{', '.join(unused)} not used by --shape {args.shape}")
    if args.plan_history is not None and not (args.controller or args.redis_url):
        parser.error("--plan-history needs --controller or --redis-url")
    if args.max_in_flight < args.procs:
        parser.error(f"--max-in-flight ({args.max_in_flight}) is split between the --procs "
                     f"{args.procs} processes: it must be at least --procs")
    if args.rate is not None and (shape := shape_from_args(args)) is not None:
        try:
            shape.validate()
        except ValueError as exc:
            parser.error(f"--shape {args.shape}: {exc}")
    try:
        config = config_from_args(args)
    except TlsError as exc:
        print(f"pipeserve-loadgen: error: {exc}", file=sys.stderr)
        return 2
    try:
        config.validate()
        report = asyncio.run(run_load(config))
    except (OSError, ValueError, SenderError) as exc:
        print(f"pipeserve-loadgen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeserve-loadgen: interrupted (Ctrl-C) before the run ended: no report", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json is not None:
        write_json(report, args.json)
    if args.records is not None:
        write_records(args.records, report.records)
    if args.plan_history is not None:
        write_plan_history(args.plan_history, report.plan_history)
    if args.figures is not None:
        from services.loadgen.figures import Run, write_figures

        try:
            write_figures([Run(args.pipeline, report.records, report.plan_history)], args.figures,
                          args.window_s)
        except ImportError as exc:   # matplotlib is in the 'sim' extra
            print(f"pipeserve-loadgen: no figures ({exc}); install the 'sim' extra", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
