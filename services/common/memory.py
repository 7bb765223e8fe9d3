"""glibc malloc thresholds for the processes that copy large messages (routers, workers).

At glibc's defaults a block of 128 KiB or more is its own ``mmap``, and the threshold then
follows the largest block freed; the heap's free top goes back to the kernel as soon as it
exceeds twice that threshold. A router that parses, copies and serialises a 200 KiB payload
per request frees about that much every request, so it hands the pages back and takes them
again, zeroed, on the next one: ~100 minor page faults per 200 KiB request where a raw
grpc.aio forwarder takes ~35 (``bench/bench_hops.py``, docs/performance.md).

:func:`tune_malloc` fixes both thresholds: blocks under ``MMAP_THRESHOLD`` (8 MiB, the default
limit on a request's input, so a ~1 MB scanned page and its copies too) come from the heap,
and up to ``TRIM_THRESHOLD`` (32 MiB) of free heap top stays with the process. A larger block
(a decoded full-size image) is still its own mapping and goes back to the kernel when freed,
so a burst of large requests leaves about the trim threshold behind per malloc arena,
and a worker that parks still hands its freed model back (``malloc_trim`` after the release,
``services.worker.core``).

The pages kept for the next request are handed back once no request comes: while tuned,
a service runs an :class:`IdleTrimmer` that calls ``malloc_trim`` after
``PIPESERVE_IDLE_TRIM_S`` seconds (default 10) without new work, once per idle spell (at
the defaults glibc trims as it frees; tuned, a front door otherwise stays at its
high-water mark after a burst).

``PIPESERVE_MALLOC_TUNING=off`` leaves glibc's defaults; the user's own glibc variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) win over this.
Off Linux, or on a C library without ``mallopt`` (musl accepts and ignores it), nothing
changes and the log says so.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import time
from typing import Callable, Mapping

from services.common.logging import get_logger

log = get_logger(__name__)

ENV = "PIPESERVE_MALLOC_TUNING"
IDLE_ENV = "PIPESERVE_IDLE_TRIM_S"
DEFAULT_IDLE_TRIM_S = 10.0
GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
M_TRIM_THRESHOLD = -1      # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20
_ON, _OFF = ("on", "1", "true", "yes"), ("off", "0", "false", "no")
_tuned = False   # set by tune_malloc: this process runs on the fixed thresholds


class MallocTuningError(ValueError):
    """``PIPESERVE_MALLOC_TUNING`` holds something other than on/off, or
    ``PIPESERVE_IDLE_TRIM_S`` something other than a positive number of seconds."""


def _libc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def chosen(environ: Mapping[str, str] | None = None) -> str:
    """What :func:`tune_malloc` will do under ``environ``: ``"tune"``, ``"off"`` (the
    variable) or ``"user"`` (the user's glibc variables are set)."""
    env = os.environ if environ is None else environ
    setting = env.get(ENV, "on").strip().lower() or "on"
    if setting not in _ON + _OFF:
        raise MallocTuningError(f"{ENV}={setting!r}: use on or off")
    if setting in _OFF:
        return "off"
    return "user" if any(v in env for v in GLIBC_VARS) else "tune"


def tune_malloc(environ: Mapping[str, str] | None = None,
                mallopt: Callable[[int, int], int] | None = None) -> str:
    """Apply the thresholds to this process; returns what happened (also logged):
    ``"tuned"``, ``"off"`` (the variable), ``"user"`` (the user's glibc variables are set)
    or ``"unsupported"``. Call it once, early, before the service allocates its buffers;
    a wrong ``PIPESERVE_IDLE_TRIM_S`` raises here too, before the service starts."""
    idle_trim_s(environ)
    outcome = chosen(environ)
    if outcome == "tune":
        fn = mallopt if mallopt is not None else _libc_mallopt()
        ok = fn is not None and fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 \
            and fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        outcome = "tuned" if ok else "unsupported"
    global _tuned
    _tuned = outcome == "tuned" and mallopt is None   # a recording mallopt tunes nothing
    log.info("malloc_tuning", outcome=outcome,
             **({"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} if outcome == "tuned" else {}))
    return outcome


def tuned() -> bool:
    """Whether :func:`tune_malloc` fixed this process's thresholds."""
    return _tuned


def malloc_trim() -> bool:
    """Hand the free heap pages of every malloc arena back to the kernel; False where the
    C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def idle_trim_s(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(IDLE_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_IDLE_TRIM_S
    except ValueError:
        raise MallocTuningError(f"{IDLE_ENV}={raw!r}: give seconds, e.g. 10") from None
    if not value > 0:
        raise MallocTuningError(f"{IDLE_ENV}={raw!r}: must be more than 0 seconds")
    return value


class IdleTrimmer:
    """Once ``activity()`` (a count of work taken in, e.g. requests received) has not moved
    for ``idle_s`` seconds, call ``trim`` once; new work starts a new idle spell. ``run``
    checks every quarter of ``idle_s`` and trims in a thread (it takes the arenas' locks,
    not the event loop)."""

    def __init__(self, activity: Callable[[], int], idle_s: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic, trim: Callable[[], object] = malloc_trim) -> None:
        self.activity = activity
        self.idle_s = idle_trim_s() if idle_s is None else idle_s
        self.clock = clock
        self.trim = trim
        self.trims = 0
        self._seen: int | None = None
        self._since = clock()
        self._done = False

    def due(self) -> bool:
        """Whether to trim now (and, if so, the idle spell counts as trimmed)."""
        now, seen = self.clock(), self.activity()
        if seen != self._seen:
            self._seen, self._since, self._done = seen, now, False
            return False
        if self._done or now - self._since < self.idle_s:
            return False
        self._done = True
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.idle_s / 4)
            if self.due():
                t0 = time.perf_counter()
                await asyncio.to_thread(self.trim)
                self.trims += 1
                log.debug("heap_trimmed", idle_s=self.idle_s, took_ms=round((time.perf_counter() - t0) * 1e3, 2))
