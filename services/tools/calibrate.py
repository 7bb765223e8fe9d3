"""A short speed probe of this host against a profile (``pipeserve-calibrate``).

    pipeserve-calibrate --profile profiles/ocr_cpu.json        # prints the factors, writes the cache

A profile is measured on one machine; machines of one kind differ up to ~4x. Before a
cluster plans on a profile, the probe times a few of its variants here (per task: the
most accurate and the fastest, batch size 1, a few pages; the child task's payloads are
the parent variant's real outputs), exactly as the profiler does (``prepare`` of every
item + ``run_batch``), and compares with the profile's p50. Every payload it times has run
once before (a new input shape's first call is a stall, not speed: on a GPU the cuDNN
algorithm search takes 0.4-2.9 s), it times at least 0.4 s per variant (on a shared host a
few milliseconds measure a moment, not the share a worker gets), and it takes the mean of
the timed batches without those over 4x their median:

- every variant of a task is scaled by the task's factor (the geometric mean of its
  probed variants' ratios), so the planner's latencies and capacities fit this host;
- within ``--tolerance`` (15 %) of 1.0 for every task the profile *matches* the host and
  is used as it is.

The result is cached per host (CPU model, core count, ONNX Runtime version, threads,
device, the profile's content) in ``runs/profiles/``, so the probe runs once per host.
Online, the controller keeps correcting the profile from the batch times its workers
report (``services.policy.calibration``); the probe only gives it a good start.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.common.spec import PipelineSpec, load_spec
from services.planner.profile import PipelineProfile, load_profile, write_profile
from services.policy.calibration import scale_profile

DEFAULT_CACHE = Path("runs/profiles")
DEFAULT_TOLERANCE = 0.15
DEFAULT_MIN_S = 0.4          # seconds of timed batches per probed variant, at least


@dataclass(frozen=True)
class ProbeResult:
    factors: dict[str, float]                                          # task -> measured / profile
    samples: dict[str, tuple[float, float]] = field(default_factory=dict)   # variant -> (profile, measured) ms
    seconds: float = 0.0

    def matches(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return all(abs(f - 1.0) <= tolerance for f in self.factors.values())

    def summary(self) -> str:
        return ", ".join(f"{t} x{f:.2f}" for t, f in self.factors.items())


def host_description(threads: int = 1, device: str = "cpu") -> str:
    import onnxruntime as ort

    from services.tools.profiler import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, ONNX Runtime {ort.__version__}, {threads} thread(s), device {device}"


def host_key(profile: PipelineProfile, threads: int = 1, device: str = "cpu") -> str:
    text = "|".join([host_description(threads, device), platform.node(), profile.key()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def probe_variants(profile: PipelineProfile, task: str) -> list[str]:
    """The variants of a task the probe times: its most accurate and its fastest."""
    t = profile.task(task)
    best = max(t.variants, key=lambda v: (v.accuracy, -v.latency(min(v.latency_ms), "p50")))
    fast = min(t.variants, key=lambda v: v.latency(min(v.latency_ms), "p50"))
    return list(dict.fromkeys([best.name, fast.name]))


def probe(spec: PipelineSpec, profile: PipelineProfile, models: Path, pages: list[bytes], *,
          repeats: int = 5, threads: int = 1, device: str = "cpu",
          log: Callable[[str], None] = print) -> ProbeResult:
    """Time the probe variants of every task (see the module docstring)."""
    from services.common.onnx import create_session
    from services.common.processing import make_processor
    t0 = time.perf_counter()
    pools: dict[str, list[bytes]] = {spec.root.name: list(pages)}
    factors: dict[str, float] = {}
    samples: dict[str, tuple[float, float]] = {}
    for task in spec.tasks:
        pool = pools.get(task.name)
        if not pool:
            continue
        logs = []
        for name in probe_variants(profile, task.name):
            proc = make_processor(spec.variant(name), models, spec.plugins)
            sess, _ = create_session(proc.model_path, prefer_gpu=device == "auto", intra_op_threads=threads)
            if task.children and not any(pools.get(c) for c in task.children):
                outs = [proc.run_batch(sess, [proc.prepare(p)])[0] for p in pool]
                for c in task.children:
                    pools[c] = [x for o in outs for x in o.child_payloads]
            measured = warm_batch_ms(proc, sess, pool, repeats)
            v = profile.task(task.name).variant(name)
            expected = v.latency_ms[min(v.latency_ms)].p50_ms / min(v.latency_ms)
            samples[name] = (expected, measured)
            logs.append(math.log(measured / expected))
        factors[task.name] = math.exp(sum(logs) / len(logs))
    result = ProbeResult(factors, samples, time.perf_counter() - t0)
    log(f"probe: {result.summary()} against {profile.source} ({result.seconds:.1f} s; "
        + ", ".join(f"{v} {m:.1f} ms vs {e:.1f} ms" for v, (e, m) in samples.items()) + ")")
    return result


def warm_batch_ms(proc, session, pool: list[bytes], repeats: int, min_s: float = DEFAULT_MIN_S,
                  clock: Callable[[], float] = time.perf_counter, outlier_k: float = 4.0) -> float:
    """Mean ms of single-item batches over ``repeats`` payloads spread over ``pool``, each
    of which ran once untimed first (its input shape warm). It times at least ``repeats``
    batches and at least ``min_s`` seconds of them (a few milliseconds catch a moment when
    the process has a core to itself; a host shared with other work gives a worker its
    share over a longer time), and leaves out batches over ``outlier_k`` x their median
    (stalls)."""
    sub = pool[::max(1, len(pool) // max(1, repeats))][:max(1, repeats)]   # spread over the pool's pages
    for x in sub:
        proc.run_batch(session, [proc.prepare(x)])
    samples: list[float] = []
    start = clock()
    while len(samples) < repeats or (clock() - start < min_s and len(samples) < 10_000):
        x = sub[len(samples) % len(sub)]
        t = clock()
        proc.run_batch(session, [proc.prepare(x)])
        samples.append((clock() - t) * 1e3)
    med = sorted(samples)[len(samples) // 2]
    kept = [ms for ms in samples if ms <= outlier_k * med]
    return sum(kept) / len(kept)


def calibrated(profile: PipelineProfile, result: ProbeResult, host: str) -> PipelineProfile:
    factors = {(t.name, v.name): result.factors.get(t.name, 1.0) for t in profile.tasks for v in t.variants}
    note = (f"probe on {host} ({time.strftime('%Y-%m-%d')}): {result.summary()}; "
            f"every variant of a task scaled by its task's factor")
    return scale_profile(profile, factors, note=note)


def profile_for_host(spec_path: Path, profile_path: Path, models: Path, pages_dir: Path, *,
                     cache_dir: Path = DEFAULT_CACHE, refresh: bool = False,
                     tolerance: float = DEFAULT_TOLERANCE, threads: int = 1, device: str = "cpu",
                     log: Callable[[str], None] = print) -> tuple[Path, ProbeResult]:
    """The profile to plan on here: ``profile_path`` when the probe finds it matches
    this host, else a calibrated copy in ``cache_dir``. Cached per host."""
    spec = load_spec(spec_path)
    profile = load_profile(profile_path)
    key = host_key(profile, threads, device)
    cache = cache_dir / f"{profile.name}-{key}.probe.json"
    out = cache_dir / f"{profile.name}-{key}.json"
    if cache.exists() and not refresh:
        data = json.loads(cache.read_text())
        result = ProbeResult({k: float(x) for k, x in data["factors"].items()},
                             {k: (float(a), float(b)) for k, (a, b) in data["samples"].items()},
                             float(data["seconds"]))
        log(f"probe (cached {cache}): {result.summary()}")
    else:
        from services.ocr.pages import load_pages

        pages = [p.png for p in load_pages(pages_dir)[:4]]
        if not pages:
            raise SystemExit(f"no pages in {pages_dir} (run `make data`)")
        result = probe(spec, profile, models, pages, threads=threads, device=device, log=log)
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"host": host_description(threads, device), "profile": str(profile_path),
                                     "factors": result.factors, "samples": result.samples,
                                     "seconds": result.seconds}, indent=1) + "\n")
    if result.matches(tolerance):
        log(f"profile {profile_path} matches this host (within {tolerance:.0%}): used as it is")
        return profile_path, result
    if refresh or not out.exists():
        write_profile(calibrated(profile, result, host_description(threads, device)), out)
    log(f"profile {profile_path} does not match this host: planning on {out} ({result.summary()})")
    return out, result


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """``--calibrate`` and ``--calibration-cache``, as the demo and ``pipeserve up`` take them."""
    p.add_argument("--calibrate", choices=("auto", "off", "refresh"), default="auto",
                   help="auto: probe this host's speed against the profile once (cached per host) and "
                        "plan on a calibrated copy when it does not match; refresh: probe again; off: "
                        "plan on the profile as it is (default auto)")
    p.add_argument("--calibration-cache", default=str(DEFAULT_CACHE),
                   help="where probe results and calibrated profiles are cached per host (default %(default)s)")


def profile_to_plan_on(spec_path: Path, profile_path: Path, models: Path, pages_dir: Path, mode: str = "auto",
                       cache_dir: Path = DEFAULT_CACHE, log: Callable[[str], None] = print) -> Path:
    """The profile a cluster's controller gets (the demo's and ``pipeserve up``'s first
    step): ``profile_path`` with ``mode`` "off", else :func:`profile_for_host`'s choice
    ("refresh": probe again)."""
    if mode == "off":
        return profile_path
    path, _ = profile_for_host(spec_path, profile_path, models, pages_dir, cache_dir=cache_dir,
                               refresh=mode == "refresh", log=log)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipeserve-calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    ap.add_argument("--profile", type=Path, default=Path("profiles/ocr_cpu.json"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--pages", type=Path, default=Path("data/eval"), help="pages to probe with (make data)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--refresh", action="store_true", help="probe again even if this host is cached")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="factors within this of 1.0 mean the profile matches (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, as workers use (default 1)")
    ap.add_argument("--device", choices=("cpu", "auto"), default="cpu")
    a = ap.parse_args(argv)
    for path, hint in ((a.models, "make models"), (a.pages, "make data"), (a.profile, "a profile file")):
        if not path.exists():
            print(f"error: {path} does not exist ({hint})", file=sys.stderr)
            return 2
    path, _ = profile_for_host(a.spec, a.profile, a.models, a.pages, cache_dir=a.cache_dir, refresh=a.refresh,
                               tolerance=a.tolerance, threads=a.threads, device=a.device)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
