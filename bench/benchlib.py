"""Helpers shared by the bench/ scripts: percentiles, a process's CPU time from /proc,
payloads the front door accepts, the machine's description, child processes that print
``READY <port>``, closed-loop and one-at-a-time client loops."""
from __future__ import annotations

import asyncio
import os
import platform
import random
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()   # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14 and 15 of stat(5)


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text[text.rindex(")") + 2:].split()[7])   # field 10 of stat(5)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a process started with start_new_session=True
    and everything it started, even once reparented), zombies left out."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None and f[0] != "Z" and int(f[3]) == sid:
                out.append(int(name))
    return out


def session_cpu_seconds(sid: int) -> float:
    total = 0.0
    for pid in session_pids(sid):
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return total


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a session this script started (by its own id)."""
    import signal
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import grpc
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "grpcio": grpc.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def png_payload(nbytes: int, seed: int = 0) -> bytes:
    """A valid PNG of exactly ``nbytes`` bytes (>= ~200): an 8x8 noise image padded with a
    private ancillary chunk (``pdPd``) before IEND, so the front door's header check
    passes and the size is what the benchmark asks for."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    iend = png.rindex(b"IEND") - 4
    pad = nbytes - len(png) - 12
    if pad < 0:
        raise ValueError(f"a PNG payload needs at least {len(png) + 12} bytes")
    body = b"pdPd" + bytes(random.Random(seed).getrandbits(8) for _ in range(pad))
    chunk = struct.pack(">I", pad) + body + struct.pack(">I", zlib.crc32(body))
    out = png[:iend] + chunk + png[iend:]
    assert len(out) == nbytes
    return out


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_ready(name: str, argv: list[str], timeout_s: float = 60.0, env: dict | None = None) -> Child:
    """Start ``argv`` (a process that prints ``READY <port>``) and wait for the line."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                         env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("READY "):
            return Child(name, p, int(line.split()[1]))
    p.kill()
    raise RuntimeError(f"{name} did not start ({argv})")


def raw_server(name: str, mode: str, *extra: str) -> Child:
    return start_ready(name, [sys.executable, str(ROOT / "bench" / "raw_grpc.py"), mode, *extra])


# -- client loops -------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]


async def sequential(call: Call, n: int) -> list[float]:
    """``n`` calls one after the other; their latencies in ms."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1e3)
    return out


@dataclass
class Throughput:
    requests: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)   # process name -> CPU seconds used
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)   # "<type>: <first line>" -> count
    minor_faults: dict[str, int] = field(default_factory=dict)  # process name (pid entries) -> faults

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def per_core(self, name: str) -> float:
        c = self.cpu_s.get(name, 0.0)
        return self.requests / c if c > 0 else float("nan")


async def closed_loop(call: Call, concurrency: int, seconds: float,
                      pids: dict[str, int | Callable[[], float]], warmup_s: float = 0.3) -> Throughput:
    """``concurrency`` callers, each calling again as soon as its call returns, for
    ``seconds`` (after ``warmup_s`` not counted); CPU time over the window of each entry
    of ``pids`` (a pid, or a function returning CPU seconds, e.g. of a whole session), and
    the minor page faults of each pid entry."""
    stop_at = 0.0
    counting = False
    done = errors = 0
    kinds: dict[str, int] = {}

    async def caller():
        nonlocal done, errors
        while True:
            now = time.perf_counter()
            if stop_at and now >= stop_at:
                return
            try:
                await call()
                if counting:
                    done += 1
            except Exception as exc:
                if counting:
                    errors += 1
                    if isinstance(exc, grpc.aio.AioRpcError):
                        kind = f"{exc.code().name}: {(exc.details() or '')[:160]}"
                    else:
                        kind = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                    kinds[kind] = kinds.get(kind, 0) + 1

    t0 = time.perf_counter()
    stop_at = t0 + warmup_s + seconds
    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    counting = True
    def read(p):
        return p() if callable(p) else cpu_seconds(p)
    cpu0 = {k: read(p) for k, p in pids.items()}
    flt0 = {k: minor_faults(p) for k, p in pids.items() if not callable(p)}
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = time.perf_counter() - start
    cpu1 = {k: read(p) for k, p in pids.items()}
    flt = {k: minor_faults(pids[k]) - f for k, f in flt0.items()}
    await asyncio.gather(*tasks)
    return Throughput(done, elapsed, {k: cpu1[k] - cpu0[k] for k in pids}, errors, kinds, flt)


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)
