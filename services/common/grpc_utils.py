"""gRPC plumbing shared by the services: server factory, channel options, and the one
place where the project's errors become status codes."""
from __future__ import annotations

import functools
import json
import time
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from services.common.errors import ServingError
from services.common.logging import get_logger

log = get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024   # pages and crop batches exceed gRPC's 4 MB default

# Retries of UNAVAILABLE live in the channel's service config, not in hand-written loops.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def make_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def make_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind ``host:port`` (port 0 picks a free one) and return the bound port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port} (in use?)")
    return bound


STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def map_errors(method: F) -> F:
    """Decorate an async servicer method: ServingError -> its status code with its
    message; anything else -> INTERNAL with a generic message, traceback in the log."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(STATUS.get(exc.code, grpc.StatusCode.INTERNAL), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc_internal_error", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")

    return wrapper  # type: ignore[return-value]


def remaining_s(deadline_unix_s: float, now: float | None = None) -> float:
    return deadline_unix_s - (time.time() if now is None else now)
