"""Workers sharing a device: what ``k`` busy workers cost each other, read from a profile.

A profile's ``sharing[device][k]`` is measured (``python -m services.tools.sharing``): the
p50 batch latency with ``k`` worker processes busy on the device over the p50 with one.
On an idle 2-core CPU host two single-threaded workers should barely slow each other
and four take about twice as long per batch; a busy host, or a GPU whose concurrent
sessions overlap well or badly, reads otherwise: the numbers are a measurement, not an
assumption of additive (processor-sharing) cost.

:func:`factor` reads a table at any ``k``:

- ``k <= 1``: 1.0 (the reference);
- between measured points: linear interpolation;
- beyond the last measured ``k_last``: ``f(k_last) * k / k_last`` -- the device is taken
  as saturated at the last point, so more workers add no throughput, only latency
  (processor sharing from the last measurement on);
- the table is read as non-decreasing (a running maximum): a point measured under its
  predecessor is noise on a busy host, and the planner's search relies on more workers
  never being faster each (:func:`services.planner.solver.solve`).

Which ``k`` a plan implies: a plan that keeps ``n`` workers busy with at most
``workers_per_device`` on one device has, in the worst packing, ``min(n,
workers_per_device)`` on the busiest device (:func:`busy_on_device`; None: every worker
shares one device, the single host).
"""
from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Mapping

from services.planner.profile import LatencyPoint, PipelineProfile, TaskProfile


def factor(table: Mapping[int, float], k: float) -> float:
    """The latency factor of ``k`` busy workers on a device measured as ``table``."""
    if k <= 1:
        return 1.0
    points = sorted({1: 1.0, **table}.items())
    ks, fs, top = [], [], 0.0
    for kk, f in points:
        top = max(top, f)
        ks.append(kk)
        fs.append(top)
    if k >= ks[-1]:
        return fs[-1] * k / ks[-1]
    i = bisect.bisect_left(ks, k)          # ks[i - 1] < k <= ks[i], i >= 1 as k > 1 = ks[0]
    w = (k - ks[i - 1]) / (ks[i] - ks[i - 1])
    return fs[i - 1] + w * (fs[i] - fs[i - 1])


def has_sharing(profile: PipelineProfile) -> bool:
    """Does any variant run on a device the profile has a sharing table for?"""
    return bool(profile.sharing) and any(
        (v.device or profile.device) in profile.sharing for t in profile.tasks for v in t.variants)


def last_measured(profile: PipelineProfile) -> int:
    """The largest ``k`` any of the profile's sharing tables measured (1 without one)."""
    return max((k for t in profile.sharing.values() for k in t), default=1)


def busy_on_device(n: int, workers_per_device: int | None) -> int:
    """Workers on the busiest device when ``n`` are busy, packed as densely as allowed."""
    return n if workers_per_device is None else min(n, workers_per_device)


def variant_factors(profile: PipelineProfile, k: int) -> dict[str, float]:
    """``variant -> factor`` at ``k`` busy workers per device, for the variants whose
    device has a table (others: absent, i.e. 1.0)."""
    out = {}
    for t in profile.tasks:
        for v in t.variants:
            table = profile.sharing.get(v.device or profile.device)
            if table is not None:
                out[v.name] = factor(table, k)
    return out


def shared_profile(profile: PipelineProfile, k: int) -> PipelineProfile:
    """``profile`` with every variant's latencies at ``k`` busy workers per device. The
    result has no sharing table: its latencies already include the sharing."""
    f = variant_factors(profile, k)
    tasks = []
    for t in profile.tasks:
        variants = tuple(
            replace(v, latency_ms={b: LatencyPoint(p.p50_ms * f.get(v.name, 1.0), p.p95_ms * f.get(v.name, 1.0))
                                   for b, p in v.latency_ms.items()})
            for v in t.variants)
        tasks.append(TaskProfile(t.name, variants, t.children, t.fan_out))
    return replace(profile, tasks=tuple(tasks), sharing={})


def candidates(n_workers: int, workers_per_device: int | None, k_last: int,
               n_min: int = 1) -> list[tuple[int, int]]:
    """``(cap on busy workers, k on the busiest device)`` the planner solves for, ascending.

    Every cap ``n`` from ``n_min`` (the workers the plan must keep anyway: one per stage)
    up to the smallest of the cluster, one device's share and ``k_last`` (past the table
    one device gains no throughput, so a bigger cap on one device only adds latency); then,
    when the cluster spans several devices, the whole cluster at ``k = min(n_workers,
    workers_per_device)`` (every device as busy as allowed)."""
    if workers_per_device is not None and workers_per_device < 1:
        raise ValueError(f"workers_per_device must be >= 1, got {workers_per_device}")
    if n_workers < 1:
        return [(n_workers, 0)]
    per_device = n_workers if workers_per_device is None else workers_per_device
    n_min = max(1, min(n_min, n_workers))
    top = max(n_min, min(n_workers, per_device, k_last))
    out = [(n, busy_on_device(n, workers_per_device)) for n in range(n_min, top + 1)]
    if top < n_workers and per_device < n_workers:
        out.append((n_workers, per_device))
    return out


WORKERS_PER_GPU_ENV = "PIPESERVE_WORKERS_PER_GPU"


def workers_per_device_from_env(environ: Mapping[str, str]) -> int | None:
    """``PIPESERVE_WORKERS_PER_GPU`` (deploy/docker-compose.yml, deploy/k8s): how many
    workers the deployment puts on one GPU; None when unset or empty (every worker shares
    one device). A service's ``main()`` reads it into its config."""
    raw = environ.get(WORKERS_PER_GPU_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{WORKERS_PER_GPU_ENV} must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{WORKERS_PER_GPU_ENV} must be a positive integer, got {raw!r}")
    return n
