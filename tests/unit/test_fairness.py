"""FairShareGate (services/policy/fairness.py): per-client shares of the front door's
receive limits, driven by hand with a fake clock (``wait_until`` / ``expire(now)``)."""
from __future__ import annotations

from services.policy.fairness import FairShareGate, Reason, ShareLimits, State

MIB = 2 ** 20
# the OCR spec's front door: 8 MiB the largest request, 3 x 8 = 24 MiB in flight, 8 reads
OCR = ShareLimits(max_inflight_bytes=24 * MIB, max_bytes=8 * MIB, max_receiving=8, max_waiting=16)
BIG = 7 * MIB
SMALL = 200 * 1024


def read(gate: FairShareGate, client: str, size: int, now: float = 0.0):
    """One request of ``client`` arrives and, if let in, its body of ``size`` is read."""
    t = gate.arrive(client, now, now + 1.0)
    if t.state is State.READING:
        gate.body_read(t, size)
    return t


def test_one_client_gets_the_earlier_shared_rule():
    g = FairShareGate(OCR)
    held = [read(g, "burst", BIG) for _ in range(4)]
    # room for one more of the largest allowed size while holding <= 24 - 8 = 16 MiB:
    # 0, 7 and 14 MiB held let a body in, 21 MiB does not
    assert [t.state for t in held] == [State.HELD] * 3 + [State.SHED]
    assert held[3].reason is Reason.OWN_BYTES
    assert g.held == 3 * BIG and g.reading == 0


def test_a_burst_client_over_its_share_never_sheds_another_client():
    g = FairShareGate(OCR)
    burst = [read(g, "burst", BIG) for _ in range(3)]
    assert g.held == 21 * MIB            # the burst client alone holds 21 of the 24 MiB
    small = read(g, "small", SMALL)      # nothing of its own in flight: always read
    assert small.state is State.HELD
    assert g.held == 21 * MIB + SMALL    # past the 24 MiB: allowed up to 2 x 24 for clients under share
    again = read(g, "burst", BIG)        # two clients: the burst client's share is 12 MiB
    assert again.state is State.SHED and again.reason is Reason.OWN_BYTES
    second_small = read(g, "small", SMALL)   # 0.2 + 0.2 <= 12: within its own share
    assert second_small.state is State.HELD
    for t in burst + [small, second_small]:
        g.leave(t)
    assert g.held == 0 and g.reading == 0


def test_the_hard_bound_holds_whatever_the_number_of_clients():
    g = FairShareGate(OCR)
    states = [read(g, f"c{i}", BIG).state for i in range(10)]
    # each client holds nothing of its own, so only the hard bound (2 x 24 = 48 MiB) stops them:
    # 0, 7, ..., 35 MiB held let one more in (+ 8 MiB <= 48 while held <= 40), 42 MiB does not
    assert states == [State.HELD] * 6 + [State.SHED] * 4
    assert g.held == 42 * MIB


def test_read_slots_are_shared_and_a_client_under_its_share_reads_at_once():
    g = FairShareGate(ShareLimits(24 * MIB, 8 * MIB, max_receiving=4))
    burst = [g.arrive("burst", 0.0, 10.0) for _ in range(4)]   # alone: all 4 slots
    assert [t.state for t in burst] == [State.READING] * 4
    small = g.arrive("small", 0.0, 10.0)     # two clients: 2 slots each; it reads none
    assert small.state is State.READING and g.reading == 5   # past 4, under the hard bound of 8
    more = g.arrive("burst", 0.0, 10.0)      # the burst client is over its 2: waits or is shed, itself only
    assert more.state is State.SHED and more.reason is Reason.OWN_READS   # no small body seen: no wait
    assert small.state is State.READING


def test_a_freed_slot_goes_to_the_client_reading_the_fewest():
    lim = ShareLimits(24 * MIB, 8 * MIB, max_receiving=2, max_waiting=16)
    g = FairShareGate(lim)
    for c in ("a", "b"):                # small bodies seen: both may wait for a slot
        g.leave(read(g, c, 1000, now=-10.0))   # long ago: no longer sending
    a1, a2 = g.arrive("a", 0.0, 10.0), g.arrive("a", 0.0, 10.0)
    assert (a1.state, a2.state) == (State.READING, State.READING)
    a3 = g.arrive("a", 0.0, 10.0)            # over the 2 slots: waits (its bodies are small)
    b1 = g.arrive("b", 0.0, 10.0)            # two clients, 1 slot each: b reads none, but 2 + 1 > 2 ...
    assert a3.state is State.WAITING
    assert b1.state is State.READING    # ... under its share it may pass the total (hard bound 4)
    b2 = g.arrive("b", 0.0, 10.0)
    assert b2.state is State.WAITING    # its one slot is taken
    changed = g.body_read(b1, 1000)     # b's slot frees: b reads 0, a reads 2 -> b's waiter first
    assert changed == [b2] and b2.state is State.READING
    assert g.body_read(a1, 1000) == []  # a still reads a2, its one slot of two clients
    changed = g.body_read(a2, 1000)     # now a reads none: its waiter gets the slot
    assert changed == [a3] and a3.state is State.READING


def test_waiting_ends_at_its_time_on_the_clock():
    g = FairShareGate(ShareLimits(24 * MIB, 8 * MIB, max_receiving=1))
    g.leave(read(g, "a", 1000, now=-10.0))
    first = g.arrive("a", 0.0, 5.0)
    waiter = g.arrive("a", 0.0, 5.0)
    assert (first.state, waiter.state) == (State.READING, State.WAITING)
    assert g.expire(4.999) == []
    assert g.expire(5.0) == [waiter] and waiter.state is State.EXPIRED and g.waiting == 0
    g.leave(waiter)                     # leaving after expiry changes nothing
    g.leave(first)
    assert g.reading == 0 and not g._active


def test_a_large_body_sheds_its_own_clients_waiters_only():
    lim = ShareLimits(int(2.5 * 300_000), 8 * MIB, max_receiving=2)
    g = FairShareGate(lim)
    for c in ("a", "b"):
        g.leave(read(g, c, 1000, now=-10.0))   # long ago: no longer sending
    big = g.arrive("a", 0.0, 9.0)
    b_read = g.arrive("b", 0.0, 9.0)
    a_wait = g.arrive("a", 0.0, 9.0)         # two clients: 1 slot each
    b_wait = g.arrive("b", 0.0, 9.0)
    assert [t.state for t in (big, a_wait, b_read, b_wait)] == [
        State.READING, State.WAITING, State.READING, State.WAITING]
    changed = g.body_read(big, 300_000)  # 4 x 300 KB per body no longer fits a's share
    assert a_wait in changed and a_wait.state is State.SHED and a_wait.reason is Reason.LARGE_BODIES
    # b's bodies are small: not shed, and a's freed slot (1 of the 2 being read now) is
    # free for anyone, so b's waiter reads at once
    assert b_wait in changed and b_wait.state is State.READING


def test_the_wait_queue_is_bounded():
    g = FairShareGate(ShareLimits(24 * MIB, 8 * MIB, max_receiving=1, max_waiting=1))
    g.leave(read(g, "a", 1000, now=-10.0))
    g.arrive("a", 0.0, 9.0)
    assert g.arrive("a", 0.0, 9.0).state is State.WAITING
    full = g.arrive("a", 0.0, 9.0)
    assert full.state is State.SHED and full.reason is Reason.WAIT_FULL


def test_a_slot_granted_to_a_waiter_that_leaves_passes_on():
    g = FairShareGate(ShareLimits(24 * MIB, 8 * MIB, max_receiving=1))
    g.leave(read(g, "a", 1000, now=-10.0))
    reading = g.arrive("a", 0.0, 9.0)
    gone, last = g.arrive("a", 0.0, 9.0), g.arrive("a", 0.0, 9.0)
    assert g.body_read(reading, 1000) == [gone] and gone.state is State.READING
    assert g.leave(gone) == [last] and last.state is State.READING   # cancelled before it read
    g.leave(reading)
    g.leave(last)
    assert (g.held, g.reading, g.waiting) == (0, 0, 0)


def test_a_client_keeps_its_share_between_requests_for_active_s():
    g = FairShareGate(OCR)                      # active_s = 2 s
    burst = read(g, "burst", BIG, now=0.0)      # alone: holds 7 MiB
    g.leave(read(g, "steady", SMALL, now=0.1))  # one request, answered at once
    assert g.active_clients() == 2              # steady sent 0.1 s ago: still sending
    late = g.arrive("burst", 0.5, 9.0)          # 7 + 8 > 24 / 2
    assert late.state is State.SHED and late.reason is Reason.OWN_BYTES
    again = g.arrive("burst", 2.2, 9.0)         # steady silent for 2.1 s: burst alone, 7 + 8 <= 24
    assert again.state is State.READING and g.active_clients() == 1
    g.leave(again)
    g.leave(burst)
    assert list(g._recent["steady"]) == [SMALL]   # an idle client's recent sizes are kept


def test_among_waiters_that_may_read_the_client_reading_fewer_goes_first():
    # no passing the totals (over_total 1): a slot freed by x is the only way in
    g = FairShareGate(ShareLimits(24 * MIB, 8 * MIB, max_receiving=8, over_total=1.0))
    for c in ("a", "b"):
        g.leave(read(g, c, 1000, now=-10.0))   # small bodies seen (long ago): a and b may wait
    x = [g.arrive("x", 0.0, 9.0) for _ in range(8)]   # alone: all 8 slots
    a1, a2, b1 = g.arrive("a", 0.0, 9.0), g.arrive("a", 0.0, 9.0), g.arrive("b", 0.0, 9.0)
    assert [t.state for t in (a1, a2, b1)] == [State.WAITING] * 3
    assert g.body_read(x[0], BIG) == [a1]   # a and b read none: the older waiter first
    assert g.body_read(x[1], BIG) == [b1]   # a reads one, b none: b's, although a2 is older
    assert a2.state is State.WAITING


def test_a_client_holding_a_large_request_is_held_to_its_share_once_another_sends():
    g = FairShareGate(OCR)
    first = read(g, "burst", BIG)
    assert read(g, "burst", BIG).state is State.HELD   # alone: 7 + 8 <= 24
    g.leave(first)                                    # holds 7 MiB again
    small = g.arrive("small", 0.0, 9.0)                    # a second client is sending
    assert small.state is State.READING
    late = g.arrive("burst", 0.0, 9.0)                     # 7 + 8 > 24 / 2: over its share
    assert late.state is State.SHED and late.reason is Reason.OWN_BYTES


def test_free_read_slots_are_anyones_however_many_clients_send():
    # Triton's perf_analyzer: a few connections (clients), several requests each in flight;
    # 3 clients make the read share 8 // 3 = 2, but with slots free nobody waits or is shed
    g = FairShareGate(OCR)
    tickets = [g.arrive(c, 0.0, 1.0) for c in ("a", "a", "b", "b", "c", "c", "c", "c")]
    assert [t.state for t in tickets] == [State.READING] * 8   # 8 = max_receiving
    over = g.arrive("c", 0.0, 1.0)           # every slot taken: c, over its share, may not read
    assert over.state is not State.READING


def test_an_arrival_counts_as_its_clients_recent_bodies_not_the_largest_allowed():
    # a load generator's connection sending 0.5 MiB pages beside another client: its share
    # is 24 / 2 = 12 MiB; holding 10 MiB it has room for one more page, though not for a
    # request of the largest allowed size (10 + 8 > 12)
    g = FairShareGate(OCR)
    page = MIB // 2
    held = [read(g, "loadgen", page) for _ in range(20)]
    assert all(t.state is State.HELD for t in held) and g.holding("loadgen") == 10 * MIB
    g.leave(read(g, "other", SMALL))         # a second client is sending
    assert g.active_clients() == 2
    assert read(g, "loadgen", page).state is State.HELD          # 10 + 0.5 <= 12
    big = read(g, "loadgen", BIG)             # the estimate is a guess; the body decides:
    assert big.state is State.SHED and big.reason is Reason.OWN_BYTES   # 10.5 + 7 > 12
    unseen = g.arrive("new", 0.0, 1.0)        # a client never seen counts as 8 MiB
    assert unseen.state is State.READING      # nothing of its own held: read
