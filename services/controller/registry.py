"""Worker registry: who is there, what they serve, when they were last heard from.

Registration is idempotent (workers retry). A worker silent for longer than
``timeout_s`` is declared lost and leaves the next plan: missed heartbeats change the
plan, they are not only logged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.plan import RegisteredWorker


@dataclass
class WorkerRecord:
    worker: RegisteredWorker
    registered_at: float
    last_seen: float
    providers: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class WorkerRegistry:
    def __init__(self, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.records: dict[str, WorkerRecord] = {}

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
        rec.last_seen = self.clock()
        rec.stats = stats
        if stats.get("providers"):
            rec.providers = list(stats["providers"])
        return True

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the timeout; return their ids."""
        now = self.clock()
        lost = [wid for wid, r in self.records.items() if now - r.last_seen > self.timeout_s]
        for wid in lost:
            del self.records[wid]
        return lost

    def live(self) -> list[RegisteredWorker]:
        return [r.worker for r in sorted(self.records.values(), key=lambda r: r.worker.worker_id)]
