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

``PIPESERVE_MALLOC_TUNING=off`` leaves glibc's defaults; the user's own glibc variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) win over this.
Off Linux, or on a C library without ``mallopt`` (musl accepts and ignores it), nothing
changes and the log says so.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Mapping

from services.common.logging import get_logger

log = get_logger(__name__)

ENV = "PIPESERVE_MALLOC_TUNING"
GLIBC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
M_TRIM_THRESHOLD = -1      # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20
_ON, _OFF = ("on", "1", "true", "yes"), ("off", "0", "false", "no")


class MallocTuningError(ValueError):
    """``PIPESERVE_MALLOC_TUNING`` holds something other than on/off."""


def _libc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def tune_malloc(environ: Mapping[str, str] | None = None,
                mallopt: Callable[[int, int], int] | None = None) -> str:
    """Apply the thresholds to this process; returns what happened (also logged):
    ``"tuned"``, ``"off"`` (the variable), ``"user"`` (the user's glibc variables are set)
    or ``"unsupported"``. Call it once, early, before the service allocates its buffers."""
    env = os.environ if environ is None else environ
    setting = env.get(ENV, "on").strip().lower() or "on"
    if setting not in _ON + _OFF:
        raise MallocTuningError(f"{ENV}={setting!r}: use on or off")
    if setting in _OFF:
        outcome = "off"
    elif any(v in env for v in GLIBC_VARS):
        outcome = "user"
    else:
        fn = mallopt if mallopt is not None else _libc_mallopt()
        ok = fn is not None and fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 \
            and fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        outcome = "tuned" if ok else "unsupported"
    log.info("malloc_tuning", outcome=outcome,
             **({"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} if outcome == "tuned" else {}))
    return outcome
