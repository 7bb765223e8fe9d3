"""What the worker's batches cost: one batch timed in the thread that runs it
(:func:`run_timed`, where its time went: :class:`BatchPhases`), and the timings kept per
(task, variant, batch size) between two heartbeats (:class:`TimingBook`): the controller
calibrates the profile with them."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from services.common.processing import ItemResult, Prepared


@dataclass
class BatchPhases:
    """Where one batch's time went, measured in the thread that ran it: the batch's
    assembly before the first model run (stacking, padding), the model runs (ONNX
    Runtime), the crop encoding the processor reported (``ItemResult.encode_s``), and
    the rest of the post-processing after the model."""

    assemble_ms: float = 0.0
    model_ms: float = 0.0
    postprocess_ms: float = 0.0
    encode_ms: float = 0.0


class TimedSession:
    """An ONNX Runtime session as a processor sees it, timing its ``run`` calls (one
    per batch, made in the inference thread; the rest is passed through). With ``lock``
    (held by the caller when it is made), each ``run`` holds it and releases it when it
    returns: what the processor does after its model call runs beside the next batch."""

    __slots__ = ("_session", "run_s", "first_start", "_lock", "_held")

    def __init__(self, session: object, lock: threading.Lock | None = None) -> None:
        self._session = session
        self.run_s = 0.0
        self.first_start: float | None = None
        self._lock = lock
        self._held = lock is not None

    def run(self, *args, **kwargs):
        if self._lock is not None and not self._held:
            self._lock.acquire()
            self._held = True
        t0 = time.perf_counter()
        if self.first_start is None:
            self.first_start = t0
        try:
            return self._session.run(*args, **kwargs)   # type: ignore[attr-defined]
        finally:
            self.run_s += time.perf_counter() - t0
            self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()   # type: ignore[union-attr]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def run_timed(run_batch: Callable, session: object, items: list[Prepared], lock: threading.Lock | None = None,
              on_start: Callable[[float], None] | None = None) -> tuple[list[ItemResult], float, BatchPhases, float]:
    """``(run_batch(session, items), seconds it took, where they went, perf_counter() at
    its start)``, timed in the thread that runs it; the session's ``run`` calls are timed
    through a wrapper. With ``lock`` the batch starts once it holds it and gives it up
    when its model call returns (or at its end, if it made none); ``on_start(t)`` hears
    when it started."""
    if lock is not None:
        lock.acquire()
    t0 = time.perf_counter()
    timed = TimedSession(session, lock)
    try:
        if on_start is not None:
            on_start(t0)
        results = run_batch(timed, items)
    finally:
        timed.release()
    total = time.perf_counter() - t0
    assemble = (timed.first_start - t0) if timed.first_start is not None else 0.0
    encode = sum(getattr(r, "encode_s", 0.0) for r in results)
    post = max(0.0, total - assemble - timed.run_s - encode)
    return results, total, BatchPhases(assemble * 1e3, timed.run_s * 1e3, post * 1e3, encode * 1e3), t0


@dataclass
class BatchTiming:
    """What batches of one (variant, batch size) cost since the last report: the sum of
    the batch's model time and its items' pre-processing time (the profile's
    definition of a batch latency), and the regions its items produced."""

    variant: str
    batch_size: int
    count: int = 0
    task: str = ""
    total_ms: float = 0.0
    max_ms: float = 0.0
    items: int = 0
    regions: int = 0


class TimingBook:
    """Batch timings since the last heartbeat. A heartbeat takes them (:meth:`take`); one
    that fails puts them back (:meth:`restore`), so each batch is reported exactly once."""

    def __init__(self) -> None:
        self._timings: dict[tuple[str, str, int], BatchTiming] = {}

    def record(self, task: str, variant: str, size: int, work_s: float, regions: int) -> None:
        t = self._timings.get((task, variant, size))
        if t is None:
            t = self._timings[(task, variant, size)] = BatchTiming(variant, size, task=task)
        ms = work_s * 1e3
        t.count += 1
        t.total_ms += ms
        t.max_ms = max(t.max_ms, ms)
        t.items += size
        t.regions += regions

    def take(self) -> list[BatchTiming]:
        """The batch timings since the last call (the heartbeat reports them once)."""
        out = list(self._timings.values())
        self._timings = {}
        return out

    def restore(self, timings: list[BatchTiming]) -> None:
        """Put back timings whose report failed, so the next heartbeat carries them."""
        for t in timings:
            cur = self._timings.get((t.task, t.variant, t.batch_size))
            if cur is None:
                self._timings[(t.task, t.variant, t.batch_size)] = t
            else:
                cur.count += t.count
                cur.total_ms += t.total_ms
                cur.max_ms = max(cur.max_ms, t.max_ms)
                cur.items += t.items
                cur.regions += t.regions
