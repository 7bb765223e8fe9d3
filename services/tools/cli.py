"""``pipeserve``: the operator's command, with subcommands.

    pipeserve up       start the whole cluster on this machine in the foreground (Ctrl-C stops it)
    pipeserve status   the live cluster at a glance: plan, workers, demand, recent failures

Each subcommand's ``--help`` says more; the services themselves keep their own commands
(``pipeserve-controller``, ``pipeserve-worker``, ``pipeserve-router``, ...).
"""
from __future__ import annotations

import argparse
import sys

from services.tools import status, up


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeserve", description="The operator's command: start a local cluster, look at a live one.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  pipeserve up\n  pipeserve status --watch\n"
                                       "  pipeserve status --wait 120 --json")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("status", help="the live cluster at a glance (plan, workers, demand, recent failures)",
                       description=status.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_arguments(s)
    u = sub.add_parser("up", help="start the whole cluster on this machine in the foreground",
                       description=up.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_arguments(u)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.command == "status":
        return status.run(a)
    if a.command == "up":
        return up.run(a)
    p.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
