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
from services.loadgen.runner import LoadConfig, run_load

DESCRIPTION = """\
Send open-loop load to a pipeline's front door (the Open Inference Protocol v2 gRPC
service, model name = pipeline name) and report what happened to every request.

Arrivals are either Poisson at --rate requests/s for --duration seconds (seeded with
--seed), or a replay of a trace file (--trace, lines 'arrival_ms,qos,deadline_ms'),
optionally sped up or slowed down with --time-scale and multiplied with --rate-scale.
Requests are sent at their scheduled times without waiting for replies; each carries a
gRPC deadline (--timeout-ms, default the SLO). Page images (and their ground truth, for
the character error rate) come from a directory written by pipeserve-make-pages.

Every request ends in exactly one outcome: answered OK (on time or late, i.e. over
--slo-ms), dropped (DEADLINE_EXCEEDED), shed (RESOURCE_EXHAUSTED), invalid
(INVALID_ARGUMENT) or another error, counted by status code; requests refused by the
--max-in-flight cap count as errors (CLIENT_IN_FLIGHT_CAP).
SLO violation ratio = (late + dropped + shed + invalid + errors) / sent.
"""

EPILOG = """\
examples:
  pipeserve-loadgen --target localhost:8001 --pages data/eval --rate 5 --duration 30
  pipeserve-loadgen --target localhost:8001 --pages data/eval \\
      --trace traces/twitter_medium_normal.txt --time-scale 0.2 --rate-scale 0.05 \\
      --json runs/trace.json
  pipeserve-loadgen --target 127.0.0.1:8001 --pages data/eval --rate 5 --duration 30 \\
      --tls-ca certs/ca.pem --tls-cert certs/client.pem --tls-key certs/client.key   # mutual TLS

exit status: 0 when the run completed (whatever the violation ratio), 2 on bad arguments,
1 when the run could not start (e.g. missing pages).
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
    mode.add_argument("--rate", type=_positive_float, metavar="R",
                      help="Poisson arrivals at R requests per second (needs --duration)")
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
    out.add_argument("--json", type=Path, metavar="FILE",
                     help="also write the report as JSON to FILE")
    out.add_argument("--quiet", action="store_true",
                     help="no progress bar (it is also off when stderr is not a terminal)")
    add_tls_arguments(p, client_only=True)
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        target=args.target, pipeline=args.pipeline, pages_dir=args.pages,
        rate=args.rate, duration_s=args.duration, trace=args.trace,
        time_scale=args.time_scale, rate_scale=args.rate_scale,
        use_trace_deadlines=args.use_trace_deadlines, seed=args.seed,
        slo_ms=args.slo_ms, timeout_ms=args.timeout_ms,
        send_timeout_param=args.send_timeout_param, max_in_flight=args.max_in_flight,
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
    try:
        config = config_from_args(args)
    except TlsError as exc:
        print(f"pipeserve-loadgen: error: {exc}", file=sys.stderr)
        return 2
    try:
        config.validate()
        report = asyncio.run(run_load(config))
    except (OSError, ValueError) as exc:
        print(f"pipeserve-loadgen: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json is not None:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
