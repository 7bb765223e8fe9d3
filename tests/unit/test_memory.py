"""services.common.memory: the routers' glibc malloc thresholds. The decision is a pure
function (tested with a recording ``mallopt``); the effect is tested on the real C library
in a child process, by the page faults a router-like allocation pattern takes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.common import memory
from services.common.memory import ENV, MallocTuningError, tune_malloc

ROOT = Path(__file__).resolve().parents[2]


def recorder(result: int = 1):
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return result
    return calls, mallopt


def test_default_sets_both_thresholds():
    calls, fn = recorder()
    assert tune_malloc({}, mallopt=fn) == "tuned"
    assert calls == [(memory.M_MMAP_THRESHOLD, 8 << 20), (memory.M_TRIM_THRESHOLD, 32 << 20)]


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no"])
def test_off_leaves_the_defaults(value):
    calls, fn = recorder()
    assert tune_malloc({ENV: value}, mallopt=fn) == "off"
    assert calls == []


@pytest.mark.parametrize("var", memory.GLIBC_VARS)
def test_the_users_own_glibc_variables_win(var):
    calls, fn = recorder()
    assert tune_malloc({var: "65536"}, mallopt=fn) == "user"
    assert calls == []


def test_a_library_that_refuses_is_reported():
    _, fn = recorder(result=0)
    assert tune_malloc({ENV: "on"}, mallopt=fn) == "unsupported"


def test_a_wrong_value_is_a_clear_error():
    with pytest.raises(MallocTuningError, match="PIPESERVE_MALLOC_TUNING='sometimes': use on or off"):
        tune_malloc({ENV: "sometimes"}, mallopt=recorder()[1])


FAULTS = textwrap.dedent("""
    import os, resource, sys
    sys.path.insert(0, sys.argv[1])
    from services.common.memory import tune_malloc
    print(tune_malloc())

    size = int(sys.argv[2])
    def request():   # a router's request: parsed, copied, serialised, then freed
        blocks = [bytearray(size) for _ in range(4)]
        del blocks

    for _ in range(50):
        request()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(400):
        request()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 400)
""")


def faults_per_request(setting: str, size: int) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in memory.GLIBC_VARS}
    env[ENV] = setting
    out = subprocess.run([sys.executable, "-c", FAULTS, str(ROOT), str(size)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[-2], float(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("size", [205_000, 1_100_000], ids=["200KB", "1.1MB page"])
def test_tuned_process_keeps_its_pages_across_large_requests(size):
    outcome, tuned = faults_per_request("on", size)
    assert outcome == "tuned"
    _, default = faults_per_request("off", size)
    # at glibc's defaults each request hands its four copies back and faults them in
    # again (~200 faults at 200 KB); tuned, the heap keeps the pages
    assert default > 50, f"the scenario no longer faults at glibc's defaults ({default}/request)"
    assert tuned < 5, f"{tuned} minor faults per request with the tuning (defaults: {default})"


# -- giving the kept pages back once idle -------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_idle_trimmer_trims_once_per_idle_spell():
    clock, work = Clock(), [0]
    trimmer = memory.IdleTrimmer(lambda: work[0], idle_s=10.0, clock=clock)
    assert not trimmer.due()                  # first look: the spell starts
    clock.t = 9.9
    assert not trimmer.due()
    clock.t = 10.0
    assert trimmer.due()                      # 10 s without new work
    clock.t = 30.0
    assert not trimmer.due()                  # once per spell
    work[0] += 1                              # a request: a new spell starts now
    assert not trimmer.due()
    clock.t = 39.0
    assert not trimmer.due()
    clock.t = 40.0
    assert trimmer.due()


def test_steady_work_is_never_trimmed():
    clock, work = Clock(), [0]
    trimmer = memory.IdleTrimmer(lambda: work[0], idle_s=1.0, clock=clock)
    for _ in range(100):
        clock.t += 0.5
        work[0] += 1
        assert not trimmer.due()


def test_the_run_loop_trims_in_a_thread_after_the_idle_time():
    import asyncio
    import threading

    async def scenario():
        where = []
        trimmer = memory.IdleTrimmer(lambda: 0, idle_s=0.08, trim=lambda: where.append(threading.get_ident()))
        task = asyncio.create_task(trimmer.run())
        await asyncio.sleep(0.5)
        task.cancel()
        return where, trimmer.trims, threading.get_ident()

    where, trims, loop_thread = asyncio.run(scenario())
    assert trims == 1 and len(where) == 1 and where[0] != loop_thread


@pytest.mark.parametrize("value, says", [("soon", "give seconds"), ("0", "more than 0"), ("-3", "more than 0")])
def test_a_wrong_idle_time_is_a_clear_error(value, says):
    with pytest.raises(MallocTuningError, match=says):
        memory.idle_trim_s({memory.IDLE_ENV: value})


def test_idle_time_default_and_setting():
    assert memory.idle_trim_s({}) == memory.DEFAULT_IDLE_TRIM_S == 10.0
    assert memory.idle_trim_s({memory.IDLE_ENV: "2.5"}) == 2.5


KEPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from services.common.memory import malloc_trim, tune_malloc, tuned

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    print(tune_malloc(), tuned())
    base = rss_mb()
    blocks = [bytearray(700_000) for _ in range(40)]   # a burst: ~28 MB of 700 KB buffers
    del blocks
    kept = rss_mb()
    malloc_trim()
    print(round(kept - base, 1), round(rss_mb() - base, 1))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_a_tuned_process_keeps_a_burst_s_pages_until_trimmed():
    env = {k: v for k, v in os.environ.items() if k not in memory.GLIBC_VARS}
    env[ENV] = "on"
    out = subprocess.run([sys.executable, "-c", KEPT, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-4:-2] == ["tuned", "True"]
    kept, trimmed = float(out[-2]), float(out[-1])
    assert kept > 20, f"the burst's pages were not kept ({kept} MB over the start)"
    assert trimmed < kept - 20, f"malloc_trim gave back too little: {kept} -> {trimmed} MB over the start"


def test_tune_malloc_refuses_a_wrong_idle_time_before_the_service_starts():
    calls, fn = recorder()
    with pytest.raises(MallocTuningError, match="PIPESERVE_IDLE_TRIM_S='soon'"):
        tune_malloc({memory.IDLE_ENV: "soon"}, mallopt=fn)
    assert calls == []
