"""PlanSampler.stop() ends the sampling loop even when a cancel is swallowed inside a
sample, as Python 3.11's ``asyncio.wait_for`` (awaited by redis-py in every command)
swallows one that lands just as its call completes (CPython gh-86296). Stopping on
``cancel()`` alone hung ``pipeserve-loadgen`` for ever, about one ``--procs`` run in four."""
from __future__ import annotations

import asyncio

from services.loadgen.plan_history import PlanSampler


class _WaitForSampler(PlanSampler):
    """Samples through ``asyncio.wait_for`` on a call the test completes: no Redis needed."""

    def __init__(self) -> None:
        super().__init__("echo", redis_url="redis://127.0.0.1:1/0", interval_s=0.01)
        self.call: asyncio.Future | None = None
        self.entered = asyncio.Event()

    async def sample(self, t_s: float) -> dict:
        self.call = asyncio.get_running_loop().create_future()
        self.entered.set()
        await asyncio.wait_for(self.call, 60)
        return {"t_s": t_s, "version": 1}


def test_stop_ends_the_loop_when_a_sample_swallows_the_cancel():
    async def run() -> tuple[bool, PlanSampler]:
        sampler = _WaitForSampler()
        await sampler.start()
        await sampler.entered.wait()
        task = sampler._task
        sampler.call.set_result(None)   # the command completes ...
        stop = asyncio.create_task(sampler.stop())   # ... and stop() cancels in the same step
        done, _ = await asyncio.wait({stop}, timeout=30)   # a bound for the old hang, not a speed check
        if not done:
            sampler._stopping = True
            task.cancel()
        return bool(done) and task.done(), sampler

    stopped, sampler = asyncio.run(run())
    assert stopped, "PlanSampler.stop() did not return: the sampling loop outlived its cancel"
    assert sampler.samples and not any("error" in s for s in sampler.samples)

