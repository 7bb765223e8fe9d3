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


def cancel_requested() -> bool:
    """True once the running task has been asked to stop (``Task.cancel()``), even when
    the ``CancelledError`` was swallowed on the way: Python 3.11's ``asyncio.wait_for``
    (redis-py awaits commands through it) drops a cancel that lands just as the awaited
    call completes (CPython gh-86296), and a loop that only waits for the exception then
    runs on for ever. Long-running loops check this after each such await."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)   # Python 3.11+
    return bool(cancelling is not None and cancelling())


def raise_if_cancel_requested() -> None:
    if cancel_requested():
        raise asyncio.CancelledError()


async def stop_tasks(tasks: list[asyncio.Task], timeout_s: float = 2.0) -> list[str]:
    """Cancel ``tasks`` and wait at most ``timeout_s`` for them; a task still running
    after that is logged (``tasks_did_not_stop``) and left behind, so the rest of a
    service's shutdown (its server, its channels) goes on. ``asyncio.run`` cancels it once
    more at exit and waits for it there: a loop that swallows every cancel still holds
    the exit, with its name in the log. Returns the names of those left behind."""
    for t in tasks:
        t.cancel()
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in done:
        if not t.cancelled():
            t.exception()   # retrieved: no "exception was never retrieved" at exit
    names = sorted(t.get_name() for t in pending)
    if names:
        log.error("tasks_did_not_stop", tasks=names, waited_s=timeout_s)
    return names


async def _run(sup: Supervisor, factory: Callable[[], Awaitable[object]], min_backoff_s: float,
               max_backoff_s: float, healthy_s: float) -> None:
    loop = asyncio.get_running_loop()
    backoff = min_backoff_s
    while True:
        started = loop.time()
        try:
            await factory()
            raise_if_cancel_requested()   # it returned because it was stopped: no restart
            sup.last_error = "returned"
            log.error("task_exited", task=sup.name, restart_in_s=backoff)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise_if_cancel_requested()
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
