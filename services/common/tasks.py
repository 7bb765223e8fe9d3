"""Supervised background tasks: a long-running loop that dies is logged and started
again, so one bug cannot silently stop a batch loop, a plan subscriber, a heartbeat or
a rate reporter for the rest of the process's life.

    task = supervise("batch-loop", core.batch_loop)

``factory`` is called again on every restart (a coroutine can be awaited only once).
A loop that returns on its own is restarted too: these loops are meant to run until
cancelled. Restarts back off from ``min_backoff_s`` to ``max_backoff_s``; a loop that
ran for ``healthy_s`` without failing starts again from the minimum. ``restarts`` on
the returned task's ``supervisor`` attribute counts them (tests and metrics read it).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from services.common.logging import get_logger

log = get_logger(__name__)


@dataclass
class Supervisor:
    name: str
    restarts: int = 0
    last_error: str = ""


async def _run(sup: Supervisor, factory: Callable[[], Awaitable[object]], min_backoff_s: float,
               max_backoff_s: float, healthy_s: float) -> None:
    loop = asyncio.get_running_loop()
    backoff = min_backoff_s
    while True:
        started = loop.time()
        try:
            await factory()
            sup.last_error = "returned"
            log.error("task_exited", task=sup.name, restart_in_s=backoff)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sup.last_error = repr(exc)
            log.exception("task_crashed", task=sup.name, restart_in_s=backoff)
        if loop.time() - started >= healthy_s:
            backoff = min_backoff_s
        sup.restarts += 1
        await asyncio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)


def supervise(name: str, factory: Callable[[], Awaitable[object]], *, min_backoff_s: float = 0.05,
              max_backoff_s: float = 5.0, healthy_s: float = 30.0) -> asyncio.Task:
    """Run ``factory()`` as a task named ``name``, restarting it whenever it ends."""
    sup = Supervisor(name)
    task = asyncio.get_running_loop().create_task(
        _run(sup, factory, min_backoff_s, max_backoff_s, healthy_s), name=name)
    task.supervisor = sup   # type: ignore[attr-defined]
    return task
