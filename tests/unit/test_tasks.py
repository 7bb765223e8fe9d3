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


class _SwallowOnce:
    """What Python 3.11's asyncio.wait_for does inside redis-py when a cancel lands just
    as the command completes (CPython gh-86296): the first CancelledError is dropped and
    the command's result returned. Later cancels go through (so a failing test ends)."""

    def __init__(self) -> None:
        self.swallowed = 0

    async def wait(self, seconds: float = 3600) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1


def test_a_loop_whose_cancel_was_swallowed_is_not_restarted():
    runs = []
    swallow = _SwallowOnce()

    async def loop():
        runs.append(1)
        await swallow.wait()   # the stop is swallowed here, and the loop returns

    async def scenario():
        task = supervise("test-loop", loop, min_backoff_s=0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        return done, task

    done, task = asyncio.run(scenario())
    assert done and task.cancelled() and runs == [1]


def test_a_plan_subscriber_stops_even_when_redis_swallows_the_cancel():
    from services.common.plan_channel import PlanSubscriber
    swallow = _SwallowOnce()

    class SwallowingPubSub:
        async def get_message(self, ignore_subscribe_messages, timeout):
            await swallow.wait()
            return None

    async def scenario():
        sub = PlanSubscriber("redis://127.0.0.1:1", "p", lambda plan: None, poll_interval_s=3600)
        task = asyncio.create_task(sub._wait_for_news(SwallowingPubSub()))
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        return done, task

    done, task = asyncio.run(scenario())
    assert swallow.swallowed == 1 and done and task.cancelled()


def test_stop_tasks_waits_a_bounded_time_and_names_a_task_that_will_not_stop():
    from services.common.tasks import stop_tasks
    swallow = _SwallowOnce()

    async def stubborn():   # swallows the stop, then needs 2 s to notice
        await swallow.wait()
        await asyncio.sleep(2)

    async def quick():
        await asyncio.sleep(3600)

    async def scenario():
        tasks = [asyncio.create_task(stubborn(), name="stubborn"), asyncio.create_task(quick(), name="quick")]
        await asyncio.sleep(0.05)
        with capture_logs() as logs:
            left = await stop_tasks(tasks, timeout_s=0.2)
        tasks[0].cancel()
        await asyncio.wait({tasks[0]}, timeout=5)
        return left, tasks, logs

    left, tasks, logs = asyncio.run(scenario())
    assert left == ["stubborn"] and tasks[1].cancelled()
    assert [e for e in logs if e["event"] == "tasks_did_not_stop"][0]["tasks"] == ["stubborn"]
