"""Independent checks of a PlanSolution against its profile (used by tests and as a
guard in ``solve``: a solution that breaks any of them is not published)."""
from __future__ import annotations

from collections import defaultdict

from services.planner.profile import PipelineProfile


def check_solution(sol, profile: PipelineProfile, slo_ms: float | None = None,
                   quantile: str = "p95", tol: float = 1e-6) -> list[str]:
    """Return the violated invariants (empty when the solution is sound)."""
    problems: list[str] = []
    if not sol.ok:
        return problems
    budget = (slo_ms if slo_ms is not None else profile.slo_ms) / 2.0
    reps = sol.replicas()
    if sum(reps.values()) > sol.n_workers:
        problems.append(f"cluster: {sum(reps.values())} replicas > {sol.n_workers} workers")
    if sol.served_qps > sol.demand_qps * (1 + tol) + tol:
        problems.append(f"served {sol.served_qps} > demand {sol.demand_qps}")
    chains = profile.chains()
    slack = 10 * tol * max(1.0, sol.served_qps)
    per_chain: dict[tuple, float] = defaultdict(float)
    load: dict[tuple, float] = defaultdict(float)
    batches_of: dict[tuple, set] = defaultdict(set)
    prefix: dict[tuple, float] = defaultdict(float)   # (task, chain, prefix buckets) -> flow
    for f in sol.flows:
        if f.rate_qps < 0:
            problems.append(f"negative flow on {f.variants}")
        lat = sum(profile.task(t).variant(v).latency(b, quantile)
                  for t, v, b in zip(f.tasks, f.variants, f.batches))
        if f.rate_qps > tol and lat > budget + 1e-9:
            problems.append(f"latency: {'/'.join(f.variants)} at {f.batches} takes {lat:.1f} ms > {budget} ms")
        per_chain[f.tasks] += f.rate_qps
        mult = 1.0
        for i, (t, v, b) in enumerate(zip(f.tasks, f.variants, f.batches)):
            if i:
                mult *= profile.task(f.tasks[i - 1]).fan_out[f.variants[i - 1]][t]
            if f.tasks == next(c for c in chains if t in c):   # count a shared task once
                load[(t, v, b)] += f.rate_qps * mult
            if profile.task(t).children and f.rate_qps > tol:
                batches_of[(t, v)].add(b)
            if len(profile.task(t).children) > 1:
                key = tuple(zip(f.variants[:i + 1], f.batches[:i + 1]))
                prefix[(t, f.tasks, key)] += f.rate_qps
    for ch in chains:
        if abs(per_chain.get(ch, 0.0) - sol.served_qps) > slack:
            problems.append(f"chain {ch} carries {per_chain.get(ch, 0.0)} != served {sol.served_qps}")
    for (t, v, b), q in load.items():
        cap = reps.get((t, v, b), 0) * profile.task(t).variant(v).throughput_qps(b, quantile)
        if q > cap * (1 + 1e-5) + 1e-6:
            problems.append(f"capacity: {t}/{v}@{b} load {q:.3f} q/s > {cap:.3f}")
    for (t, v), bs in batches_of.items():
        if len(bs) > 1:
            problems.append(f"{t}/{v} has children but runs batch sizes {sorted(bs)}")
    for t in profile.tasks:
        if len(t.children) < 2:
            continue
        reps_chains = [next(ch for ch in chains if t.name in ch and ch[ch.index(t.name) + 1] == c)
                       for c in t.children]
        for k in {k for (tt, _, k) in prefix if tt == t.name}:
            vals = [prefix.get((t.name, ch, k), 0.0) for ch in reps_chains]
            if max(vals) - min(vals) > slack:
                problems.append(f"branches of {t.name} disagree on {k}: {vals}")
    return problems
