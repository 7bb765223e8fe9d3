"""The worker's table of model slots, keyed by (task, variant).

Each slot holds one model (:class:`~services.worker.host.ModelHost`) in a role:

- ``planned``: the model the plan runs on this worker; during a swap, also the one that
  serves until the new planned model is loaded;
- ``burst``: the plan's burst variant for the worker's task (``Plan.burst``);
- ``standby``: the model a parked worker keeps ready for the step that brings it back
  (``Plan.standby``);
- ``lingering``: a model the plan moved away from; it serves queries routed by the
  previous plan until its linger ends, then it is freed.

:meth:`SlotTable.reconcile` is the one step that, given what the plan wants
(:class:`Want`), re-labels the slots there are, frees those whose role ended (a burst or
standby the plan no longer names, a lingering slot past its linger, a load no longer
wanted) and evicts, least recently used first, ready lingering and standby slots while
the table is over its memory budget; it never evicts a planned, burst or loading slot.
It returns the burst and standby models wanted but not held, for the caller to load.
Pure bookkeeping: no I/O, no event loop, time passed in (``time.monotonic()`` seconds).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from enum import Enum

from services.worker.host import ModelHost

Key = tuple[str, str]   # (task, variant)


class Role(str, Enum):
    PLANNED = "planned"
    BURST = "burst"
    STANDBY = "standby"
    LINGERING = "lingering"


class SlotState(str, Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass(eq=False)
class Slot:
    task: str
    variant: str
    role: Role
    size_mb: float = 0.0          # estimate (the model file's size), counted from the load's start
    state: SlotState = SlotState.LOADING
    host: ModelHost | None = None
    last_used: float = 0.0        # monotonic: loaded, switched to, or given a query
    until: float = math.inf       # lingering: when its linger ends
    loaded: asyncio.Event = field(default_factory=asyncio.Event)   # set when its load ended (either way)

    @property
    def key(self) -> Key:
        return (self.task, self.variant)

    @property
    def ready(self) -> bool:
        return self.state is SlotState.READY

    def __str__(self) -> str:
        return f"{self.task}/{self.variant}"


@dataclass(frozen=True)
class Want:
    """What the plan wants held: the planned model serving now and, during a swap, the
    planned model loading to replace it; the burst variant; a parked worker's standby."""

    serving: Key | None = None
    target: Key | None = None
    burst: Key | None = None
    standby: Key | None = None

    def role_of(self, key: Key) -> Role | None:
        if key in (self.serving, self.target):
            return Role.PLANNED
        if key == self.burst:
            return Role.BURST
        if key == self.standby:
            return Role.STANDBY
        return None


@dataclass
class Reconciled:
    freed: list[tuple[Slot, str]] = field(default_factory=list)   # (slot, why)
    missing: list[tuple[Key, Role]] = field(default_factory=list)   # burst / standby wanted, not held


class SlotTable:
    """``budget_mb`` (0: none) bounds the sum of the slots' size estimates; ``linger_s``
    is how long a model the plan moved away from keeps serving stale-routed queries."""

    def __init__(self, linger_s: float, budget_mb: float = 0.0) -> None:
        if budget_mb < 0:
            raise ValueError(f"the model memory budget must be >= 0 MB (0: none), got {budget_mb}")
        self.linger_s = linger_s
        self.budget_mb = budget_mb
        self.slots: dict[Key, Slot] = {}

    def get(self, key: Key) -> Slot | None:
        return self.slots.get(key)

    def ready_host(self, key: Key | None) -> ModelHost | None:
        slot = self.slots.get(key) if key is not None else None
        return slot.host if slot is not None and slot.ready else None

    @property
    def held_mb(self) -> float:
        return sum(s.size_mb for s in self.slots.values())

    def add(self, key: Key, role: Role, size_mb: float, now: float) -> Slot:
        """A slot for a load starting now (its size counts against the budget at once)."""
        if key in self.slots:
            raise ValueError(f"slot {key[0]}/{key[1]} is held already")
        slot = self.slots[key] = Slot(key[0], key[1], role, size_mb, last_used=now)
        return slot

    def mark_ready(self, slot: Slot, host: ModelHost, now: float) -> None:
        slot.host, slot.state, slot.last_used = host, SlotState.READY, now
        slot.loaded.set()

    def remove(self, slot: Slot) -> None:
        """Forget ``slot`` and its model (queries queued on the model keep it until they ran)."""
        if self.slots.get(slot.key) is slot:
            del self.slots[slot.key]
        slot.host = None
        slot.loaded.set()

    def touch(self, host: ModelHost, now: float) -> None:
        slot = self.slots.get((host.variant.task, host.variant.name))
        if slot is not None and slot.host is host:
            slot.last_used = now

    def lingering(self, task: str) -> ModelHost | None:
        """The most recently used lingering model of ``task`` (it serves stale-routed queries)."""
        held = [s for s in self.slots.values() if s.task == task and s.role is Role.LINGERING and s.ready]
        return max(held, key=lambda s: s.last_used).host if held else None

    def loading_planned(self, task: str | None) -> Slot | None:
        """The planned model of ``task`` (None: any) being loaded now."""
        for s in self.slots.values():
            if s.role is Role.PLANNED and not s.ready and (task is None or s.task == task):
                return s
        return None

    def reconcile(self, want: Want, now: float) -> Reconciled:
        """Re-label, free and evict as the module docstring says; return what was freed and
        the burst and standby models to load."""
        out = Reconciled()
        for key, slot in list(self.slots.items()):
            role = want.role_of(key)
            if role in (Role.PLANNED, Role.BURST):
                slot.role, slot.until = role, math.inf
                continue
            if slot.role is Role.PLANNED and slot.ready:
                slot.role, slot.until = Role.LINGERING, now + self.linger_s
            if slot.role is Role.LINGERING and slot.until > now:
                continue        # it serves stale-routed queries until its linger ends (then stands by if named)
            if role is Role.STANDBY:
                slot.role, slot.until = role, math.inf
                continue
            why = "linger ended" if slot.role is Role.LINGERING else f"{slot.role.value} no longer named"
            self.remove(slot)
            out.freed.append((slot, why))
        out.freed.extend((s, "memory budget") for s in self.make_room(0.0, force=True)[1])
        out.missing = [(k, r) for k, r in ((want.burst, Role.BURST), (want.standby, Role.STANDBY))
                       if k is not None and k not in self.slots and want.role_of(k) is r]
        return out

    def make_room(self, size_mb: float, force: bool) -> tuple[bool, list[Slot]]:
        """Evict ready lingering and standby slots, least recently used first, until
        ``size_mb`` more fits the budget. Returns (it fits, the slots evicted). When even
        evicting them all would not make it fit: with ``force`` (a planned load, which the
        plan needs whatever the budget) evict them all anyway, else evict none."""
        if self.budget_mb <= 0:
            return True, []
        victims = sorted((s for s in self.slots.values()
                          if s.ready and s.role in (Role.LINGERING, Role.STANDBY)), key=lambda s: s.last_used)
        held = self.held_mb
        need = held + size_mb - self.budget_mb
        fits = need <= sum(s.size_mb for s in victims)
        if not fits and not force:
            return False, []
        evicted: list[Slot] = []
        for s in victims:
            if need <= 0:
                break
            self.remove(s)
            evicted.append(s)
            need -= s.size_mb
        return fits, evicted
