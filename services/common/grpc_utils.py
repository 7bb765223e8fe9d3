"""gRPC plumbing shared by the services: server factory, channel options, TLS, and the
one place where the project's errors become status codes."""
from __future__ import annotations

import argparse
import functools
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
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


# -- TLS -------------------------------------------------------------------------------
# Environment variables giving the TLS flags' defaults, so one environment configures a
# whole cluster (docs/security.md).
ENV_TLS_CERT = "PIPESERVE_TLS_CERT"
ENV_TLS_KEY = "PIPESERVE_TLS_KEY"
ENV_TLS_CA = "PIPESERVE_TLS_CA"
ENV_TLS_CLIENT_AUTH = "PIPESERVE_TLS_CLIENT_AUTH"
ENV_TLS = "PIPESERVE_TLS"          # clients only (the load generator): TLS with the system's roots


class TlsError(ValueError):
    """A TLS setting that cannot work: a missing or unreadable file, a key that does not
    match its certificate, mutual TLS without a CA."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"the {what} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """TLS for a service's gRPC server and its outbound channels (paths of PEM files).

    As a server: ``cert``/``key`` are its identity; ``ca`` verifies client certificates,
    and ``require_client_cert`` refuses clients without one (mutual TLS). As a client:
    ``ca`` verifies the server (None: the system's roots) and ``cert``/``key``, when
    given, are presented as the client certificate. Services that are both (workers call
    the controller; routers call workers and child routers) use one identity for both,
    so its certificate needs the serverAuth and clientAuth key usages. Files are read
    whenever credentials are made, so a renewed certificate is used by new channels.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if (self.cert is None) != (self.key is None):
            raise TlsError("a TLS certificate and its private key go together "
                           "(--tls-cert and --tls-key)")
        if self.require_client_cert and self.ca is None:
            raise TlsError("requiring client certificates (--tls-client-auth) needs the CA "
                           "that signs them (--tls-ca)")

    @property
    def mode(self) -> str:
        """``mtls`` or ``tls``, for logs."""
        return "mtls" if self.require_client_cert else "tls"

    def check(self) -> "TlsConfig":
        """Read and parse every file now, so a bad path or a mismatched key fails at start
        with one clear message (:class:`TlsError`) instead of a failed bind later."""
        if self.cert is not None and self.key is not None:
            _read_pem(self.cert, "TLS certificate (--tls-cert)")
            _read_pem(self.key, "TLS private key (--tls-key)")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert, self.key)
            except ssl.SSLError as exc:
                raise TlsError(f"the TLS certificate {self.cert} and key {self.key} do not load "
                               f"as a matching pair: {exc.reason or exc}") from None
        if self.ca is not None:
            _read_pem(self.ca, "TLS CA bundle (--tls-ca)")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(self.ca))
            except ssl.SSLError as exc:
                raise TlsError(f"the TLS CA bundle {self.ca} holds no usable certificate: "
                               f"{exc.reason or exc}") from None
        return self

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise TlsError("a TLS server needs a certificate and a private key (--tls-cert, --tls-key)")
        ca = _read_pem(self.ca, "TLS CA bundle (--tls-ca)") if self.ca is not None else None
        return grpc.ssl_server_credentials(
            [(_read_pem(self.key, "TLS private key (--tls-key)"),
              _read_pem(self.cert, "TLS certificate (--tls-cert)"))],
            root_certificates=ca, require_client_auth=self.require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        with_identity = self.cert is not None and self.key is not None
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "TLS CA bundle (--tls-ca)") if self.ca else None,
            private_key=_read_pem(self.key, "TLS private key (--tls-key)") if with_identity else None,
            certificate_chain=_read_pem(self.cert, "TLS certificate (--tls-cert)") if with_identity else None)

    def to_args(self) -> list[str]:
        """The service flags that give this configuration (for spawning processes)."""
        args: list[str] = []
        for flag, value in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if value is not None:
                args += [flag, str(value)]
        if self.require_client_cert:
            args.append("--tls-client-auth")
        return args


def tls_mode(tls: TlsConfig | None) -> str:
    return "off" if tls is None else tls.mode


def add_tls_arguments(parser: argparse.ArgumentParser, *, client_only: bool = False) -> None:
    """Add the TLS flags to a service's parser; defaults come from PIPESERVE_TLS_* .

    Services (``client_only=False``) turn TLS on with ``--tls-cert`` and ``--tls-key``:
    their server and every channel they open then use TLS. The load generator
    (``client_only=True``) turns it on with ``--tls``, ``--tls-ca`` or ``--tls-cert``."""
    g = parser.add_argument_group(
        "TLS (default: plaintext)",
        "Defaults come from PIPESERVE_TLS_* variables (docs/security.md).")
    if client_only:
        g.add_argument("--tls", action="store_true", default=_env_flag(ENV_TLS),
                       help=f"call the server over TLS, verifying it with the system's CA roots "
                            f"unless --tls-ca is given (implied by --tls-ca and --tls-cert; "
                            f"default ${ENV_TLS}=1)")
        g.add_argument("--tls-ca", default=os.environ.get(ENV_TLS_CA) or None, metavar="PEM",
                       help=f"CA bundle that verifies the server's certificate (default ${ENV_TLS_CA})")
        g.add_argument("--tls-cert", default=os.environ.get(ENV_TLS_CERT) or None, metavar="PEM",
                       help=f"client certificate chain, for servers that require mutual TLS "
                            f"(with --tls-key; default ${ENV_TLS_CERT})")
        g.add_argument("--tls-key", default=os.environ.get(ENV_TLS_KEY) or None, metavar="PEM",
                       help=f"private key of --tls-cert (default ${ENV_TLS_KEY})")
        return
    g.add_argument("--tls-cert", default=os.environ.get(ENV_TLS_CERT) or None, metavar="PEM",
                   help=f"this service's certificate chain; with --tls-key its gRPC server uses "
                        f"TLS, and so do its calls to other services (workers to the controller, "
                        f"routers to workers and child routers), which present this certificate "
                        f"as the client certificate (default ${ENV_TLS_CERT})")
    g.add_argument("--tls-key", default=os.environ.get(ENV_TLS_KEY) or None, metavar="PEM",
                   help=f"private key of --tls-cert (default ${ENV_TLS_KEY})")
    g.add_argument("--tls-ca", default=os.environ.get(ENV_TLS_CA) or None, metavar="PEM",
                   help=f"CA bundle that verifies the services this one calls and, with "
                        f"--tls-client-auth, its clients (default ${ENV_TLS_CA}; without it, "
                        f"servers are verified with the system's CA roots)")
    g.add_argument("--tls-client-auth", action="store_true", default=_env_flag(ENV_TLS_CLIENT_AUTH),
                   help=f"mutual TLS: refuse clients without a certificate signed by --tls-ca "
                        f"(default ${ENV_TLS_CLIENT_AUTH}=1)")


def tls_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
                  ) -> TlsConfig | None:
    """The checked TLS configuration the flags of :func:`add_tls_arguments` ask for, or
    None for plaintext. On a bad setting: with ``parser``, print one line
    ``<prog>: error: ...`` and exit with status 2; without, raise :class:`TlsError`."""
    try:
        cert, key, ca = args.tls_cert, args.tls_key, args.tls_ca
        if hasattr(args, "tls_client_auth"):        # a service
            client_auth = bool(args.tls_client_auth)
            if cert is None and key is None:
                if ca is not None or client_auth:
                    raise TlsError("--tls-ca/--tls-client-auth need this service's certificate "
                                   "and key (--tls-cert, --tls-key)")
                return None
        else:                                       # a client only
            client_auth = False
            if not (getattr(args, "tls", False) or ca or cert or key):
                return None
        return TlsConfig(cert=cert, key=key, ca=ca, require_client_cert=client_auth).check()
    except TlsError as exc:
        if parser is None:
            raise
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def make_channel(address: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: plaintext, or TLS when ``tls`` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)


def make_sync_channel(address: str, tls: TlsConfig | None = None,
                      options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel (tools, tests): plaintext, or TLS when ``tls`` is given."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def make_server(max_receive_bytes: int | None = None, bdp_probe: bool = True) -> grpc.aio.Server:
    """An asyncio server; TLS is chosen per port by :func:`bind`. ``max_receive_bytes``
    lowers the largest message it accepts (default MAX_MESSAGE_BYTES); gRPC refuses a
    larger one itself with RESOURCE_EXHAUSTED. ``bdp_probe=False`` turns off HTTP/2
    bandwidth-delay probing, which otherwise grows the flow-control windows, and so what
    the transport buffers of streams not read yet (the front door, docs/reliability.md)."""
    return grpc.aio.server(options=server_options(max_receive_bytes, bdp_probe))


def server_options(max_receive_bytes: int | None = None, bdp_probe: bool = True) -> list[tuple[str, Any]]:
    """The channel arguments :func:`make_server` gives its server."""
    options = list(SERVER_OPTIONS)
    if max_receive_bytes is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", int(max_receive_bytes)))
    if not bdp_probe:
        options.append(("grpc.http2.bdp_probe", 0))
    return options


def bind(server: grpc.aio.Server, host: str, port: int, tls: TlsConfig | None = None) -> int:
    """Bind ``host:port`` (port 0 picks a free one), plaintext or with ``tls``, and return
    the bound port."""
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        try:
            bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
        except RuntimeError:
            bound = 0
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port} ("
                           + ("in use?" if tls is None else "in use, or the TLS certificate/key rejected?")
                           + ")")
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
