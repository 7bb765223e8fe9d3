"""Redis URLs carry credentials: keep them out of logs, and fail fast on wrong ones.

The services connect with ``redis.asyncio.Redis.from_url`` (``plan_channel.connect``),
so every form redis-py parses works unchanged (docs/security.md):

* ``redis://:PASSWORD@host:6379/0`` (``requirepass``) and ``redis://USER:PASSWORD@host:6379/0`` (ACL user);
* ``rediss://...`` for TLS, with redis-py's query arguments, e.g.
  ``rediss://:PASSWORD@host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/pipeserve/ca.pem``
  (and ``ssl_certfile``/``ssl_keyfile`` for a client certificate).

Percent-encode reserved characters in the user name and password (``quote(pw, safe="")``).
"""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.exceptions import AuthenticationError, RedisError, ResponseError

from services.common.plan_channel import connect

MASK = "***"
_SECRET_QUERY_KEYS = {"password", "ssl_password"}


class RedisAuthError(RuntimeError):
    """Redis refused this process's credentials (a configuration error, not an outage)."""


def redact_url(url: str | None) -> str | None:
    """``url`` with its password (in the authority or the query) replaced by ``***``;
    the user name, host, port, database and other query arguments stay readable."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, sep, _password = userinfo.partition(":")
            # a lone 'x@host' is masked too: it is often a password written without ':'
            netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k in _SECRET_QUERY_KEYS for k, _ in pairs):
                query = urlencode([(k, MASK if k in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                                  safe="/*")
        out = url if netloc == parts.netloc else url.replace(parts.netloc, netloc, 1)
        return out if query == parts.query else out.replace("?" + parts.query, "?" + query, 1)
    except ValueError:
        return "<unparsable redis url>"


def is_auth_error(exc: BaseException) -> bool:
    """Redis refused the credentials: no password where one is required, a wrong
    password or user, or a password sent to a server that has none."""
    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, ResponseError) and any(
        s in str(exc) for s in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username"))


async def check_credentials(url: str, timeout_s: float = 5.0) -> None:
    """PING Redis once. Raise :class:`RedisAuthError` (message without the password)
    when it refuses the credentials; any other failure (Redis not up yet, a network
    error) passes, for the services' reconnect loops to retry."""
    client = connect(url)
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        if is_auth_error(exc):
            raise RedisAuthError(f"Redis at {redact_url(url)} refused the credentials: {exc} "
                                 f"(check the user and password in the Redis URL)") from None
    finally:
        try:
            await client.aclose()
        except Exception:  # closing a connection that never opened may fail too
            pass
