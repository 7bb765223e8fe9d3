"""Fair shares of the front door's receive limits among its clients.

The front door bounds what requests cost it before it has looked at them: the bytes of
requests read and not answered yet (``max_inflight_bytes``), and the bodies being read at
once (``max_receiving``), with a short queue of arrivals waiting for a read slot. Shared by
all clients, those limits let one client's burst of large uploads shed or delay every
other client's small requests. :class:`FairShareGate` splits them: each client that has
something in flight, being read or waiting, or sent a request in the last ``active_s``
seconds (an *active* client, the arriving one included) gets an equal share,
``max_inflight_bytes / n`` and ``max_receiving // n`` (at least 1), and

* a client over its own share is shed (or waits) itself; it never sheds another; with
  other clients sending, an arrival counts against its client's share as the largest of
  that client's recent bodies (``max_bytes`` for a client not seen yet), so a client of
  small pages is not shed for room only a largest-allowed request would need (its body,
  once read, is checked at its real size);
* read slots are shared only when they are contended: while fewer than ``max_receiving``
  bodies are being read, any client's arrival is read at once;
* a client with nothing in flight always has one request read, whatever its size;
* a client under its share may take the totals past ``max_inflight_bytes`` and
  ``max_receiving`` (the clients over their share add nothing until they are back under
  it, so the excess drains), but never past ``over_total`` times them: a hard bound on
  memory whatever the number of clients;
* a freed read slot goes to the waiting arrival of the client reading the fewest bodies
  (the oldest of its arrivals first).

A client sending now and then (2 requests a second, each answered in a few hundred ms)
keeps its share between its requests for ``active_s``: a burst client then holds its
share, not the whole, and a page of the steady client waits behind fewer of the burst's
in the pipeline (the workers serve by deadline, and the burst's came first).

With one client this is the front door's earlier shared rule exactly: a body is read when
the client holds at most ``max_inflight_bytes - max_bytes`` (room for one more request of
the largest allowed size) and fewer than ``max_receiving`` bodies are being read; once
read, a body that would take what it holds past ``max_inflight_bytes`` is shed; an arrival
over the read limit waits when its recent bodies were small (``wait_headroom`` times the
largest of them, for each body read and waiting, fits in its room left) and fewer than
``max_waiting`` wait, else it is shed at once, unread.

Pure: no I/O and no clock of its own. Times (``now``, ``wait_until``) are in whatever
monotonic clock the caller uses. The caller maps each :class:`Ticket` to its waiting
request, and wakes those whose state the gate's methods return as changed.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class ShareLimits:
    max_inflight_bytes: int
    max_bytes: int                 # the largest request allowed (the spec's input.max_bytes)
    max_receiving: int = 8
    max_waiting: int = 16
    wait_headroom: float = 4.0
    recent_bodies: int = 16        # per client: how many of its last body sizes are kept
    over_total: float = 2.0        # clients under their share: the totals' hard bound, x the limits
    remembered_clients: int = 1024  # idle clients whose recent body sizes are kept
    active_s: float = 2.0          # a client that sent a request this recently keeps its share


class State(str, Enum):
    READING = "reading"    # may read its body now (holds a read slot)
    WAITING = "waiting"    # waits for a read slot
    HELD = "held"          # read; its bytes count in flight until it leaves
    SHED = "shed"          # refused; ``reason`` says which limit
    EXPIRED = "expired"    # its wait outlasted ``wait_until``
    LEFT = "left"


class Reason(str, Enum):
    OWN_BYTES = "own_bytes"        # the client's share of the bytes in flight is used up
    TOTAL_BYTES = "total_bytes"    # the hard bound on all bytes in flight
    OWN_READS = "own_reads"        # no read slot, and the client's recent bodies are too large to wait
    WAIT_FULL = "wait_full"        # no read slot, and ``max_waiting`` arrivals wait already
    LARGE_BODIES = "large_bodies"  # was waiting; the client's bodies became too large to wait


class Ticket:
    """One arrival at the gate. ``state`` changes only through the gate's methods."""

    __slots__ = ("client", "seq", "wait_until", "state", "reason", "size")

    def __init__(self, client: str, seq: int, wait_until: float) -> None:
        self.client = client
        self.seq = seq
        self.wait_until = wait_until
        self.state = State.READING
        self.reason: Reason | None = None
        self.size = 0

    def __repr__(self) -> str:
        return f"Ticket({self.client!r}#{self.seq} {self.state.value}{'/' + self.reason.value if self.reason else ''})"


class _Client:
    __slots__ = ("held", "reading", "waiting", "recent")

    def __init__(self, recent: deque) -> None:
        self.held = 0
        self.reading = 0
        self.waiting: deque[Ticket] = deque()
        self.recent = recent

    def idle(self) -> bool:
        return self.held == 0 and self.reading == 0 and not self.waiting


class FairShareGate:
    """See the module docstring. ``held``, ``reading`` and ``waiting`` are the totals."""

    def __init__(self, limits: ShareLimits) -> None:
        self.limits = limits
        self._active: dict[str, _Client] = {}
        self._recent: OrderedDict[str, deque] = OrderedDict()   # idle clients' recent sizes
        self._seen: OrderedDict[str, float] = OrderedDict()      # client -> its last arrival, oldest first
        self._seq = itertools.count()
        self.held = 0
        self.reading = 0
        self.waiting = 0

    # -- shares ---------------------------------------------------------------------

    def active_clients(self, also: str | None = None) -> int:
        """Clients with something in flight, being read or waiting, or that sent a request
        in the last ``active_s`` (as of the last arrival), with ``also``."""
        n = len(self._active) + sum(1 for c in self._seen if c not in self._active)
        return n + (also is not None and also not in self._active and also not in self._seen)

    def _saw(self, client: str, now: float) -> None:
        self._seen.pop(client, None)
        while self._seen and next(iter(self._seen.values())) <= now - self.limits.active_s:
            self._seen.popitem(last=False)
        self._seen[client] = now

    def byte_share(self, client: str) -> float:
        return self.limits.max_inflight_bytes / self.active_clients(client)

    def read_share(self, client: str) -> int:
        return max(1, self.limits.max_receiving // self.active_clients(client))

    def holding(self, client: str) -> int:
        c = self._active.get(client)
        return 0 if c is None else c.held

    def _client(self, name: str) -> _Client:
        c = self._active.get(name)
        if c is None:
            recent = self._recent.pop(name, None)
            c = self._active[name] = _Client(recent if recent is not None
                                             else deque(maxlen=self.limits.recent_bodies))
        return c

    def _retire(self, name: str) -> None:
        c = self._active.get(name)
        if c is not None and c.idle():
            del self._active[name]
            if c.recent:
                self._recent[name] = c.recent
                while len(self._recent) > self.limits.remembered_clients:
                    self._recent.popitem(last=False)

    def _bytes_refused(self, name: str, c: _Client, size: int) -> Reason | None:
        """Why ``size`` more bytes may not be held for client ``name`` (None: they may)."""
        lim = self.limits
        if c.held > 0 and c.held + size > self.byte_share(name):
            return Reason.OWN_BYTES
        if self.held > 0 and self.held + size > lim.over_total * lim.max_inflight_bytes:
            return Reason.TOTAL_BYTES
        return None

    def _may_read(self, name: str, c: _Client) -> bool:
        lim = self.limits
        if self.reading < lim.max_receiving:
            return True       # a free slot: shares bind only when the slots are contended
        if c.reading >= self.read_share(name):
            return False
        # past the total only while under its share, and never past the hard bound; with
        # one active client the share is the total, so this never passes it
        return self.active_clients(name) > 1 and self.reading < lim.over_total * lim.max_receiving

    def _may_wait(self, name: str, c: _Client, extra: int) -> bool:
        """The client's bodies being read and waiting (and ``extra`` more), at
        ``wait_headroom`` times the largest of its recent ones, fit in its room left."""
        largest = self.limits.wait_headroom * max(c.recent, default=self.limits.max_bytes)
        return (c.reading + len(c.waiting) + extra) * largest <= self.byte_share(name) - c.held

    # -- transitions ----------------------------------------------------------------

    def arrive(self, client: str, now: float, wait_until: float) -> Ticket:
        """A request of ``client`` arrives at ``now``, its body not read yet: READING (read
        it now), WAITING (for a read slot, until ``wait_until`` at most) or SHED."""
        self._saw(client, now)
        t = Ticket(client, next(self._seq), wait_until)
        c = self._client(client)
        # alone, the earlier shared rule: room for one more request of the largest allowed
        # size; among several, its share is judged by its own recent bodies (a client of
        # 1 MB pages would otherwise be shed holding 4 of them beside one other client)
        guess = self.limits.max_bytes if self.active_clients(client) == 1 else \
            max(c.recent, default=self.limits.max_bytes)
        reason = self._bytes_refused(client, c, guess)
        if reason is None and not c.waiting and self._may_read(client, c):
            c.reading += 1
            self.reading += 1
            return t
        if reason is None:
            if self.waiting >= self.limits.max_waiting:
                reason = Reason.WAIT_FULL
            elif not self._may_wait(client, c, 1):
                reason = Reason.OWN_READS
        if reason is not None:
            t.state, t.reason = State.SHED, reason
            self._retire(client)
            return t
        t.state = State.WAITING
        c.waiting.append(t)
        self.waiting += 1
        return t

    def body_read(self, t: Ticket, size: int) -> list[Ticket]:
        """``t``'s body (``size`` bytes) is read: it is HELD, or SHED when holding it would
        pass the client's share or the hard bound. Returns the waiting tickets whose state
        changed (granted a slot, or shed)."""
        assert t.state is State.READING, t
        c = self._active[t.client]
        c.reading -= 1
        self.reading -= 1
        c.recent.append(size)
        reason = self._bytes_refused(t.client, c, size)
        if reason is None:
            t.state, t.size = State.HELD, size
            c.held += size
            self.held += size
        else:
            t.state, t.reason = State.SHED, reason
        changed = self._pass_slots()
        self._retire(t.client)
        return changed

    def leave(self, t: Ticket) -> list[Ticket]:
        """``t`` is done with, whatever its state (answered, failed, cancelled): its slot,
        bytes or place in the queue are given up. Returns the waiting tickets whose state
        changed."""
        c = self._active.get(t.client)
        state, t.state = t.state, State.LEFT
        if c is None:
            return []
        if state is State.READING:
            c.reading -= 1
            self.reading -= 1
        elif state is State.HELD:
            c.held -= t.size
            self.held -= t.size
        elif state is State.WAITING:
            c.waiting.remove(t)
            self.waiting -= 1
        changed = self._pass_slots()
        self._retire(t.client)
        return changed

    def expire(self, now: float) -> list[Ticket]:
        """Waiting tickets whose ``wait_until`` has come: EXPIRED, out of the queue."""
        out = []
        for name, c in list(self._active.items()):
            for t in [t for t in c.waiting if t.wait_until <= now]:
                c.waiting.remove(t)
                self.waiting -= 1
                t.state = State.EXPIRED
                out.append(t)
            self._retire(name)
        return out

    def _pass_slots(self) -> list[Ticket]:
        """Shed the waiters of clients whose bodies became too large to wait for, then
        grant read slots to waiters, the client reading the fewest bodies first."""
        if not self.waiting:
            return []
        changed = []
        for c_name, c in list(self._active.items()):
            if c.waiting and not self._may_wait(c_name, c, 0):
                while c.waiting:
                    t = c.waiting.popleft()
                    self.waiting -= 1
                    t.state, t.reason = State.SHED, Reason.LARGE_BODIES
                    changed.append(t)
        while True:
            ready = [(c.reading, c.waiting[0].seq, name) for name, c in self._active.items()
                     if c.waiting and self._may_read(name, c)]
            if not ready:
                break
            _, _, name = min(ready)
            c = self._active[name]
            t = c.waiting.popleft()
            self.waiting -= 1
            c.reading += 1
            self.reading += 1
            t.state = State.READING
            changed.append(t)
        for name in {t.client for t in changed}:
            self._retire(name)
        return changed
