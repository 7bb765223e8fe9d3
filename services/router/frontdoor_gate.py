"""The front door's receive gate: :class:`services.policy.fairness.FairShareGate` on the
event loop. An arrival gets a read slot at once, waits for one (a future, woken when the
gate hands it a slot or sheds it, or when its wait outlasts its deadline) or is shed, in
each case before its body is read; the messages a client gets are written here.

Clients are told apart by :func:`client_of`: the ``x-pipeserve-client`` metadata value
where a client sends one (several connections of one client then share one share), else
the peer address with its port (one connection = one client)."""
from __future__ import annotations

import asyncio

from services.common.errors import DeadlineMissed, Shed
from services.policy.fairness import FairShareGate, Reason, ShareLimits, State, Ticket

CLIENT_METADATA = "x-pipeserve-client"
"""Metadata key naming the client a request counts for in the front door's fair shares."""


def client_of(context) -> str:
    """The client a request counts for: its ``x-pipeserve-client`` metadata, else its
    peer (``ipv4:127.0.0.1:54321``: one connection), else "" (a context without either,
    as in unit tests)."""
    metadata = getattr(context, "invocation_metadata", None)
    for key, value in (metadata() or ()) if metadata is not None else ():
        if key == CLIENT_METADATA and value:
            return f"id:{value if isinstance(value, str) else value.decode(errors='replace')}"[:200]
    peer = getattr(context, "peer", None)
    return (peer() or "") if peer is not None else ""


class ReceiveGate:
    """Adapter of :class:`FairShareGate`; ``wait_until`` in the event loop's clock.

    ``enter`` returns a ticket in state READING or raises Shed / DeadlineMissed; the
    caller then reports ``body_read`` (raises Shed when the body would pass the client's
    share) and, in every case, ``leave`` once the request is answered."""

    def __init__(self, limits: ShareLimits) -> None:
        self.limits = limits
        self.policy = FairShareGate(limits)
        self._futures: dict[Ticket, asyncio.Future] = {}

    @property
    def inflight_bytes(self) -> int:
        return self.policy.held

    @property
    def receiving(self) -> int:
        return self.policy.reading

    @property
    def waiting(self) -> int:
        return self.policy.waiting

    async def enter(self, client: str, wait_until: float) -> Ticket:
        t = self.policy.arrive(client, asyncio.get_running_loop().time(), wait_until)
        if t.state is State.SHED:
            raise self._shed(t)
        if t.state is State.READING:
            return t
        loop = asyncio.get_running_loop()
        future = self._futures[t] = loop.create_future()
        timer = loop.call_at(wait_until, self._expire)
        try:
            await future
        except BaseException:      # cancelled (the client went away, or the deadline timer)
            self._wake(self.policy.leave(t))   # a slot handed to it as it was cancelled passes on
            raise
        finally:
            timer.cancel()
            self._futures.pop(t, None)
        if t.state is State.READING:
            return t
        if t.state is State.EXPIRED:
            raise DeadlineMissed(f"the request's deadline passed while it waited for one of the "
                                 f"{self.limits.max_receiving} slots to read its body; dropped "
                                 "before it was read")
        raise self._shed(t)

    def body_read(self, t: Ticket, size: int) -> None:
        self._wake(self.policy.body_read(t, size))
        if t.state is State.SHED:
            raise self._shed(t, size)

    def leave(self, t: Ticket) -> None:
        self._wake(self.policy.leave(t))

    def _expire(self) -> None:
        self._wake(self.policy.expire(asyncio.get_running_loop().time()))

    def _wake(self, changed: list[Ticket]) -> None:
        for t in changed:
            future = self._futures.get(t)
            if future is not None and not future.done():
                future.set_result(t.state)

    def _shed(self, t: Ticket, size: int | None = None) -> Shed:
        p, mib = self.policy, 2 ** 20
        limit = f"(limit {self.limits.max_inflight_bytes / mib:.1f} MiB of requests in flight)"
        n = p.active_clients(t.client)
        share = (f"; this client holds {p.holding(t.client) / mib:.1f} MiB, its share is "
                 f"{p.byte_share(t.client) / mib:.1f} MiB with {n} clients sending" if n > 1 else "")
        if t.reason is Reason.LARGE_BODIES:
            what = (f"large requests arrived while it waited to be read; {p.held / mib:.1f} MiB "
                    f"of requests in flight")
        elif size is not None:
            what = (f"{p.held / mib:.1f} MiB of requests in flight, this one ({size / mib:.1f} MiB) "
                    f"would pass the limit")
        else:
            what = f"{p.held / mib:.1f} MiB of requests in flight and {p.reading} being received"
        if t.reason is Reason.TOTAL_BYTES:
            limit = (f"(limit {self.limits.over_total * self.limits.max_inflight_bytes / mib:.1f} MiB "
                     "of requests in flight from all clients)")
        return Shed(f"server busy: {what} {limit}{share}; retry later")
