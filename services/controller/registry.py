"""Worker registry: who is there, what they serve, when they were last heard from.

Registration is idempotent (workers retry). A worker silent for longer than
``timeout_s`` is declared lost and leaves the next plan: missed heartbeats change the
plan, they are not only logged.

A worker whose heartbeats go on while its running batch is stuck (a model call that does
not return: ``batch_running_s`` far past ``batch_expected_s``, ``policy.health.batch_stuck``)
leaves the plan the same way: ``expire`` returns it with the lost ones and ``live``
leaves it out, its record kept (logged ``worker_stuck``). The first heartbeat that shows
the batch ended drops the record and answers "unknown" (``worker_unstuck``): the worker
registers again, and the controller plans with it as with any worker that (re)joins.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.logging import get_logger
from services.common.plan import RegisteredWorker
from services.policy.health import batch_stuck

log = get_logger(__name__)


@dataclass
class WorkerRecord:
    worker: RegisteredWorker
    registered_at: float
    last_seen: float
    providers: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    stuck: bool = False      # its running batch is stuck: out of the plan until it ends


class WorkerRegistry:
    def __init__(self, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.records: dict[str, WorkerRecord] = {}
        self._stuck_new: list[str] = []    # stuck since the last expire()

    def register(self, worker_id: str, address: str, task: str, providers: list[str]) -> bool:
        """Returns True when this changes the membership (new worker or new address/task)."""
        now = self.clock()
        rec = self.records.get(worker_id)
        w = RegisteredWorker(worker_id, address, task)
        if rec is not None and rec.worker == w:
            rec.last_seen = now
            rec.providers = providers or rec.providers
            return False
        self.records[worker_id] = WorkerRecord(w, now, now, list(providers))
        return True

    def heartbeat(self, worker_id: str, stats: dict) -> bool:
        """Record a heartbeat; False if the worker is unknown (it must register again)."""
        rec = self.records.get(worker_id)
        if rec is None:
            return False
        running, expected = float(stats.get("batch_running_s", 0.0)), float(stats.get("batch_expected_s", 0.0))
        stuck = batch_stuck(running, expected)
        if rec.stuck and not stuck:
            del self.records[worker_id]      # back: it registers again and rejoins the plan
            log.info("worker_unstuck", worker_id=worker_id)
            return False
        rec.last_seen = self.clock()
        rec.stats = stats
        if stats.get("providers"):
            rec.providers = list(stats["providers"])
        if stuck and not rec.stuck:
            rec.stuck = True
            self._stuck_new.append(worker_id)
            log.warning("worker_stuck", worker_id=worker_id, batch_running_s=round(running, 2),
                        batch_expected_s=round(expected, 4))
        return True

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the timeout; return their ids and those of
        the workers found stuck since the last call (they leave the plan too)."""
        now = self.clock()
        lost = [wid for wid, r in self.records.items() if now - r.last_seen > self.timeout_s]
        for wid in lost:
            del self.records[wid]
        stuck, self._stuck_new = [w for w in self._stuck_new if w in self.records and w not in lost], []
        return lost + stuck

    def live(self) -> list[RegisteredWorker]:
        """The workers plans may use: registered, heard from, not stuck."""
        return [r.worker for r in sorted(self.records.values(), key=lambda r: r.worker.worker_id)
                if not r.stuck]
