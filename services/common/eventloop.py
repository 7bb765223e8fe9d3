"""Which asyncio event loop a service runs on: ``PIPESERVE_EVENT_LOOP=asyncio`` (the
default) or ``uvloop`` (the optional ``uvloop`` extra). The router, the worker and the
controller start through :func:`run_service`; the local cluster's processes inherit the
variable. ``bench/bench_hops.py --uvloop`` measures what uvloop changes for a router hop
(docs/performance.md)."""
from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine

from services.common.logging import get_logger

log = get_logger(__name__)

ENV = "PIPESERVE_EVENT_LOOP"
KINDS = ("asyncio", "uvloop")


class EventLoopError(RuntimeError):
    """An unknown loop kind, or uvloop asked for and not installed."""


def loop_kind(environ: dict[str, str] | None = None) -> str:
    kind = (os.environ if environ is None else environ).get(ENV, "").strip().lower() or "asyncio"
    if kind not in KINDS:
        raise EventLoopError(f"{ENV}={kind!r} is not a known event loop; use one of {', '.join(KINDS)}")
    return kind


def run_service(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(coro)`` on the event loop ``PIPESERVE_EVENT_LOOP`` names."""
    try:
        kind = loop_kind()
        log.info("event_loop", kind=kind)
        if kind == "uvloop":
            try:
                import uvloop
            except ImportError:
                raise EventLoopError(f"{ENV}=uvloop needs the uvloop package "
                                     "(pip install 'pipeserve[uvloop]')") from None
            if hasattr(asyncio, "Runner"):   # Python 3.11+
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(coro)
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())   # Python 3.10
            return asyncio.run(coro)
    except BaseException:
        coro.close()   # never awaited: no "coroutine was never awaited" warning on top
        raise
    return asyncio.run(coro)
