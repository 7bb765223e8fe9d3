"""Publishing and following versioned plans through Redis.

Layout per pipeline: the key ``pipeserve:<pipeline>:plan`` holds the current plan as
JSON, ``pipeserve:<pipeline>:plan_version`` is the version counter, and every new
plan's version is announced on the pub/sub channel ``pipeserve:<pipeline>:plans``.

Guarantees:
- ``PlanPublisher.publish`` is atomic (one Lua script): the key only ever moves to a
  higher version, and the notification is sent in the same step.
- ``PlanSubscriber`` applies only plans newer than the one it runs, validates each
  against the spec first (an invalid plan is logged and ignored), and keeps the last
  good plan while Redis is unreachable, reconnecting with backoff. It also re-reads the
  key every ``poll_interval_s`` so a missed notification delays a plan, never loses it.
- Every Redis outage a publisher or subscriber meets is logged twice, whatever its length:
  ``redis_unreachable`` at the first failed call, ``redis_recovered`` (with ``outage_s``,
  first failure to first success) when Redis answers again (:class:`RedisOutage`).
  ``plan_restored`` says the controller put its plan back into a Redis that lost it.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.logging import get_logger
from services.common.plan import Plan
from services.common.tasks import raise_if_cancel_requested

log = get_logger(__name__)

_PUBLISH_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, decoded = pcall(cjson.decode, cur)
  if ok and decoded['version'] ~= nil and tonumber(decoded['version']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


def plan_key(pipeline: str) -> str:
    return f"pipeserve:{pipeline}:plan"


def version_key(pipeline: str) -> str:
    return f"pipeserve:{pipeline}:plan_version"


def channel(pipeline: str) -> str:
    return f"pipeserve:{pipeline}:plans"


def frontdoor_key(pipeline: str, router_id: str) -> str:
    """A front door's request counter (hash: received, ts), read by the controller."""
    return f"pipeserve:{pipeline}:frontdoor:{router_id}"


def frontdoor_pattern(pipeline: str) -> str:
    return f"pipeserve:{pipeline}:frontdoor:*"


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                   health_check_interval=10)


class RedisOutage:
    """One service's view of Redis being away: logs ``redis_unreachable`` once per outage
    (at the first failure, with its error) and ``redis_recovered`` with the outage's
    length at the first success after it; repeated failures and successes log nothing."""

    def __init__(self, who: str, pipeline: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.who = who
        self.pipeline = pipeline
        self.clock = clock
        self.since: float | None = None   # the outage's first failure (None: reachable)

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> bool:
        """A Redis call failed. Returns True when this starts an outage."""
        if self.since is not None:
            return False
        self.since = self.clock()
        log.warning("redis_unreachable", who=self.who, pipeline=self.pipeline, error=str(exc) or type(exc).__name__)
        return True

    def succeeded(self) -> float | None:
        """A Redis call succeeded. Returns the outage's length when this ends one."""
        if self.since is None:
            return None
        outage = self.clock() - self.since
        self.since = None
        log.info("redis_recovered", who=self.who, pipeline=self.pipeline, outage_s=round(outage, 3))
        return outage


class PlanPublisher:
    """Assigns versions and publishes plans. Used by the controller only; its ``outage``
    logs Redis outages (the controller reports its other Redis calls there too)."""

    def __init__(self, client: aioredis.Redis, pipeline: str) -> None:
        self.client = client
        self.pipeline = pipeline
        self.last_version = 0
        self.outage = RedisOutage("controller", pipeline)

    async def _tracked(self, call: Awaitable):
        try:
            result = await call
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            raise
        self.outage.succeeded()
        return result

    async def current(self) -> Plan | None:
        raw = await self.client.get(plan_key(self.pipeline))
        return None if raw is None else Plan.from_json(raw, source="redis")

    async def publish(self, plan: Plan) -> Plan:
        return await self._tracked(self._publish(plan))

    async def _publish(self, plan: Plan) -> Plan:
        version = int(await self.client.incr(version_key(self.pipeline)))
        restored = version <= self.last_version
        if restored:
            # Redis lost its state (restart without persistence): continue after the
            # last version this controller published so subscribers accept the plan.
            version = self.last_version + 1
            await self.client.set(version_key(self.pipeline), version)
        stamped = plan.with_version(version)
        applied = await self.client.eval(_PUBLISH_IF_NEWER, 2, plan_key(self.pipeline),
                                         channel(self.pipeline), stamped.to_json(), str(version))
        if not applied:
            raise RuntimeError(f"plan v{version} not published: a newer plan is already stored")
        self.last_version = version
        log.info("plan_published", pipeline=self.pipeline, plan_version=version,
                 workers=len(stamped.workers), source=stamped.source)
        if restored:   # the store had lost the plan: this one puts a plan back
            log.info("plan_restored", pipeline=self.pipeline, plan_version=version, by="publish")
        return stamped

    async def ensure(self, plan: Plan) -> bool:
        """Make sure Redis holds ``plan`` (or a newer one): after Redis lost its data (a
        restart without persistence) store it again under its own version and notify.
        Subscribers that run it ignore the repeat; new ones find it. Returns True when it
        had to restore the plan."""
        return await self._tracked(self._ensure(plan))

    async def _ensure(self, plan: Plan) -> bool:
        raw = await self.client.get(plan_key(self.pipeline))
        if raw is not None:
            try:
                if Plan.from_json(raw, source="redis").version >= plan.version:
                    return False
            except Exception:   # a malformed stored plan: overwrite it with ours
                pass
            await self.client.delete(plan_key(self.pipeline))
        counter = await self.client.get(version_key(self.pipeline))
        if counter is None or int(counter) < plan.version:
            await self.client.set(version_key(self.pipeline), plan.version)
        applied = await self.client.eval(_PUBLISH_IF_NEWER, 2, plan_key(self.pipeline),
                                         channel(self.pipeline), plan.to_json(), str(plan.version))
        if applied:
            log.info("plan_restored", pipeline=self.pipeline, plan_version=plan.version, by="ensure")
        return bool(applied)


PlanCallback = Callable[[Plan], "Awaitable[None] | None"]


class PlanSubscriber:
    """Follows the pipeline's plan. ``current`` is the last good plan (or None)."""

    def __init__(self, url: str, pipeline: str, on_plan: PlanCallback,
                 validate: Callable[[Plan], None] | None = None,
                 poll_interval_s: float = 2.0, max_backoff_s: float = 5.0, who: str = "subscriber") -> None:
        self.url = url
        self.pipeline = pipeline
        self.on_plan = on_plan
        self.validate = validate
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self.current: Plan | None = None
        self.connected = False
        self._rejected_version = 0
        self._rejected_raw: int | None = None
        self._poke = asyncio.Event()
        self.outage = RedisOutage(who, pipeline)

    async def _apply_raw(self, raw: bytes | None) -> None:
        """Parse, validate and apply one stored plan. Never raises (but for
        cancellation): a malformed or invalid plan is logged once and skipped, the last
        good plan stays; a failing ``on_plan`` callback is logged and the next plan is
        still applied."""
        if raw is None:
            return
        try:
            plan = Plan.from_json(raw, source="redis")
        except Exception as exc:   # SpecError, or anything a hostile value provokes
            digest = hash(raw)
            if digest != self._rejected_raw:
                self._rejected_raw = digest
                log.error("plan_rejected", pipeline=self.pipeline, error=str(exc),
                          keeping=self.current.version if self.current else None)
            return
        if not plan.is_newer_than(self.current) or plan.version == self._rejected_version:
            return
        if self.validate is not None:
            try:
                self.validate(plan)
            except Exception as exc:
                self._rejected_version = plan.version
                log.error("plan_rejected", pipeline=self.pipeline, plan_version=plan.version,
                          error=str(exc), keeping=self.current.version if self.current else None)
                return
        previous = self.current
        self.current = plan
        log.info("plan_applied", pipeline=self.pipeline, plan_version=plan.version,
                 previous_version=previous.version if previous else None)
        try:
            result = self.on_plan(plan)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("plan_callback_failed", pipeline=self.pipeline, plan_version=plan.version)

    async def _wait_for_news(self, pubsub) -> None:
        """Return on a notification, a poke, or after ``poll_interval_s``. Waits in short
        slices rather than cancelling a pending read (a read cancelled half-way could
        leave the connection mid-message)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.poll_interval_s
        while not self._poke.is_set():
            left = end - loop.time()
            if left <= 0:
                return
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(0.25, left))
            raise_if_cancel_requested()   # a stop that redis-py's wait may have swallowed
            if msg is not None:
                return

    def poke(self) -> None:
        """Re-read the stored plan now (e.g. a peer runs a newer version than ours)."""
        self._poke.set()

    async def run(self) -> None:
        """Follow plans until cancelled. Never raises on Redis errors."""
        backoff = 0.2
        reported = False   # a failure before the first connection is logged once, too
        while True:
            client = connect(self.url)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(channel(self.pipeline))
                raw = await client.get(plan_key(self.pipeline))
                self.outage.succeeded()
                await self._apply_raw(raw)
                if not self.connected:
                    log.info("plan_channel_connected", pipeline=self.pipeline)
                self.connected = True
                backoff = 0.2
                while True:
                    await self._wait_for_news(pubsub)
                    self._poke.clear()
                    # On a notification, a poke or a quiet poll interval, re-read the key.
                    raw = await client.get(plan_key(self.pipeline))
                    raise_if_cancel_requested()
                    await self._apply_raw(raw)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.outage.failed(exc)
                if self.connected:
                    log.warning("plan_channel_lost", pipeline=self.pipeline, error=str(exc),
                                keeping_version=self.current.version if self.current else None)
                elif not reported:
                    log.warning("plan_channel_unreachable", pipeline=self.pipeline, error=str(exc),
                                retry="with backoff")
                reported = True
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            except Exception:   # a bug must not end plan-following: log, reconnect, go on
                log.exception("plan_subscriber_error", pipeline=self.pipeline,
                              keeping_version=self.current.version if self.current else None)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            finally:
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except Exception:  # closing a broken connection may fail too
                    pass
