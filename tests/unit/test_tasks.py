"""Supervised background loops: a loop that dies is logged and started again."""
import asyncio

from structlog.testing import capture_logs

from services.common.tasks import supervise


def test_a_crashing_loop_is_restarted_and_logged():
    runs = []

    async def loop():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"crash {len(runs)}")
        await asyncio.sleep(3600)          # the third run stays up

    async def scenario():
        task = supervise("test-loop", loop, min_backoff_s=0.01)
        while len(runs) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        restarts = task.supervisor.restarts
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return restarts, task

    with capture_logs() as logs:
        restarts, task = asyncio.run(scenario())
    assert restarts == 2 and task.cancelled()
    crashed = [e for e in logs if e["event"] == "task_crashed"]
    assert [e["task"] for e in crashed] == ["test-loop", "test-loop"]


def test_a_loop_that_returns_is_restarted_too():
    runs = []

    async def loop():
        runs.append(1)

    async def scenario():
        task = supervise("returns", loop, min_backoff_s=0.001, max_backoff_s=0.001)
        while len(runs) < 5:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert len(runs) >= 5
