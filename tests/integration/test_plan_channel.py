"""Versioned plans through a real Redis server: publish, follow, survive Redis going away."""
import asyncio

import pytest

from services.common.plan import ANY_PATH, Plan, WorkerAssignment
from services.common.plan_channel import PlanPublisher, PlanSubscriber, connect
from services.common.redis_server import RedisServer


def plan(variant="v1"):
    return Plan(0, "p", {"w": WorkerAssignment("w", "h:1", "t", variant, 1)}, {"t": {ANY_PATH: {"w": 1.0}}})


async def wait_for(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


def test_publish_follow_and_keep_last_plan_while_redis_is_away():
    server = RedisServer().start()
    port = server.port

    async def scenario():
        nonlocal server
        client = connect(server.url)
        pub = PlanPublisher(client, "p")
        seen = []
        sub = PlanSubscriber(server.url, "p", seen.append, poll_interval_s=0.2, max_backoff_s=0.5)
        task = asyncio.create_task(sub.run())
        p1 = await pub.publish(plan("v1"))
        await wait_for(lambda: sub.current is not None and sub.current.version == p1.version)
        p2 = await pub.publish(plan("v2"))
        await wait_for(lambda: sub.current.version == p2.version)
        assert [p.workers["w"].variant for p in seen] == ["v1", "v2"]

        server.stop()                                   # Redis goes away
        await wait_for(lambda: not sub.connected)
        assert sub.current.version == p2.version        # last good plan kept
        server = RedisServer(port=port).start()         # back, empty (no persistence)
        await client.aclose()
        client2 = connect(server.url)
        pub2 = PlanPublisher(client2, "p")
        pub2.last_version = p2.version                  # the controller remembers its last version
        p3 = await pub2.publish(plan("v3"))
        assert p3.version == p2.version + 1
        await wait_for(lambda: sub.current.version == p3.version)
        assert sub.connected and seen[-1].workers["w"].variant == "v3"
        task.cancel()
        await client2.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_publisher_refuses_to_move_the_key_backwards():
    with RedisServer() as server:
        async def scenario():
            client = connect(server.url)
            pub = PlanPublisher(client, "p")
            await pub.publish(plan("v1"))
            await pub.publish(plan("v2"))
            await client.set("pipeserve:p:plan_version", 0)     # someone reset the counter
            other = PlanPublisher(client, "p")                  # a second controller, no memory
            with pytest.raises(RuntimeError, match="newer plan"):
                await other.publish(plan("old"))
            assert (await pub.current()).workers["w"].variant == "v2"
            await client.aclose()

        asyncio.run(scenario())


def test_a_redis_outage_is_logged_once_with_its_length_and_the_plan_is_restored():
    from structlog.testing import capture_logs

    server = RedisServer().start()
    port = server.port

    async def scenario():
        nonlocal server
        client = connect(server.url)
        pub = PlanPublisher(client, "p")
        sub = PlanSubscriber(server.url, "p", lambda p: None, poll_interval_s=0.1, max_backoff_s=0.2)
        task = asyncio.create_task(sub.run())
        p1 = await pub.publish(plan("v1"))
        await wait_for(lambda: sub.current is not None and sub.current.version == p1.version)

        server.stop()                                   # Redis goes away for a while
        await wait_for(lambda: not sub.connected)
        for _ in range(3):                              # the controller keeps trying to restore
            with pytest.raises(Exception):
                await pub.ensure(p1)
        await asyncio.sleep(1.0)                        # the subscriber retries several times
        server = RedisServer(port=port).start()         # back, empty (no persistence)
        await wait_for(lambda: sub.connected)
        assert await pub.ensure(p1) is True             # the plan in force is put back
        assert (await pub.current()).version == p1.version
        task.cancel()
        await client.aclose()

    try:
        with capture_logs() as logs:
            asyncio.run(scenario())
    finally:
        server.stop()
    down = [e for e in logs if e["event"] == "redis_unreachable"]
    up = [e for e in logs if e["event"] == "redis_recovered"]
    # one outage: each of the two parties logs it once and its end once, with its length
    assert sorted(e["who"] for e in down) == ["controller", "subscriber"]
    assert sorted(e["who"] for e in up) == ["controller", "subscriber"]
    assert all(e["outage_s"] > 0 for e in up)
    restored = [e for e in logs if e["event"] == "plan_restored"]
    assert len(restored) == 1 and restored[0]["by"] == "ensure"


def test_a_publish_into_a_redis_that_lost_its_plan_is_logged_as_a_restore():
    from structlog.testing import capture_logs

    with RedisServer() as server:
        async def scenario():
            client = connect(server.url)
            pub = PlanPublisher(client, "p")
            await pub.publish(plan("v1"))
            await pub.publish(plan("v2"))
            await client.flushall()                     # as after a restart without persistence
            p3 = await pub.publish(plan("v3"))
            assert p3.version == 3
            await client.aclose()

        with capture_logs() as logs:
            asyncio.run(scenario())
    restored = [e for e in logs if e["event"] == "plan_restored"]
    assert [(e["plan_version"], e["by"]) for e in restored] == [(3, "publish")]
