"""structlog setup shared by every service: one line per lifecycle event, key=value
on a terminal, JSON with ``--log-json`` / ``PIPESERVE_LOG_JSON=1``."""
from __future__ import annotations

import faulthandler
import logging
import signal
import sys

import structlog


def configure_logging(service: str, *, json_logs: bool = False, level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = (structlog.processors.JSONRenderer() if json_logs
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    enable_stack_dumps()


def enable_stack_dumps(sig: int = signal.SIGUSR1) -> None:
    """``kill -USR1 <pid>`` writes every thread's Python stack to stderr (the service's
    log), without stopping the process: what a hung service was waiting on. The local
    cluster sends it before it SIGKILLs a process that did not stop in its grace time."""
    try:
        faulthandler.register(sig, file=sys.stderr, all_threads=True, chain=False)
    except (AttributeError, ValueError, OSError):   # stderr without a file descriptor
        pass


def get_logger(name: str | None = None):
    return structlog.get_logger(name)
