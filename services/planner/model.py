"""The allocation model: configurations, buckets and the parametrised CVXPY problem.

Vocabulary (see ``docs/planner.md`` for the maths):

* a **chain** is a root-to-leaf sequence of tasks; a tree with two leaves has two chains;
* a **bucket** is one (task, variant, batch size): the unit that gets replicas ``r``;
* a **configuration** k is one variant *and* batch size per task of a chain whose batch
  latencies sum to at most ``SLO / 2``; ``x_k`` is the root request rate (q/s) on it.
  A configuration is a variant path ``p`` plus the batch sizes it runs at, so the
  path split ``c_p`` of the brief is ``sum_k x_k / D`` over the configurations of ``p``.

Latency linearisation: the latency limit is enforced by enumeration (only fitting
configurations exist). Routing is keyed by the upstream *variant* path, not by batch
sizes, so a variant with children must run one batch size for all its traffic (binary
``y``) -- then every combination the routers can produce is one of the enumerated,
fitting configurations. Leaf variants may run several batch sizes. With
``leaf_pruning`` a leaf variant only uses batch sizes that are the fastest fitting one
for at least one prefix (every prefix may use all of those that fit). This is exact for
the LP; the MILP is exact with respect to this configuration set.

The problem is built once per (profile, SLO, latency quantile, integrality); demand,
cluster size, floors, objective weights, bounds and the previous allocation are
``cp.Parameter``s, so a re-solve only re-applies parameters.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from services.planner.profile import PipelineProfile, VariantProfile


@dataclass(frozen=True)
class SolveLimits:
    """How much work one solver call may do. Node and simplex-iteration counts are the
    limits that shape results: they are the same on a fast and a slow machine, so a run
    is a function of its inputs. ``time_limit_s`` is only a safety net for a live
    controller; a solve that reaches it is counted (``SolveInfo.time_limit_hit``)."""
    node_limit: int = 5_000             # branch-and-bound nodes per MILP call
    iteration_limit: int = 1_000_000    # simplex iterations per call
    time_limit_s: float = 60.0


@dataclass(frozen=True)
class SolveInfo:
    """What the last solver call cost (reported; never used to decide)."""
    seconds: float = 0.0
    nodes: int = 0
    iterations: int = 0
    time_limit_hit: bool = False



def _quiet_highs_banner() -> None:
    """HiGHS prints a copyright banner to the process's stdout (fd 1, from C++) the first
    time a solver object is made, whatever its output options; a service's stdout is its
    log and a CLI's stdout its answer. Make that first object with fd 1 on /dev/null."""
    try:
        import highspy
    except ImportError:   # cvxpy without HiGHS: nothing to quiet
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_quiet_highs_banner()

@dataclass(frozen=True)
class Bucket:
    task: str
    variant: str
    batch: int
    latency_ms: float
    thr_qps: float


@dataclass(frozen=True)
class Config:
    chain: int                    # index into PlanningModel.chains
    variants: tuple[str, ...]
    batches: tuple[int, ...]
    buckets: tuple[int, ...]      # bucket index per stage
    mult: tuple[float, ...]       # queries per root request arriving at each stage
    accuracy: float               # path accuracy A(p)


def candidate_batches(v: VariantProfile, budget_ms: float, quantile: str) -> list[int]:
    """Batch sizes that fit ``budget_ms`` and are not dominated by a batch with no more
    latency and at least the throughput (such a batch serves everything the other does)."""
    pts = [(b, v.latency(b, quantile)) for b in v.latency_ms if v.latency(b, quantile) <= budget_ms]
    keep = []
    for b, lat in pts:
        thr = b / lat
        beaten = any(l2 <= lat and b2 / l2 >= thr and (l2 < lat or b2 / l2 > thr or b2 < b)
                     for b2, l2 in pts if b2 != b)
        if not beaten:
            keep.append(b)
    return sorted(keep)


def _accuracy_order(profile: PipelineProfile, u: VariantProfile, w: VariantProfile) -> tuple[bool, bool]:
    """``(no_worse, better)``: is ``w`` at least as accurate as ``u`` -- its own accuracy and,
    where the profile has measured path accuracies, on every measured path through either
    with the other substituted -- and strictly more accurate somewhere?"""
    no_worse, better = w.accuracy >= u.accuracy, w.accuracy > u.accuracy
    for key in profile.path_accuracy:
        names = key.split("/")
        if u.name not in names and w.name not in names:
            continue
        au = profile.path_accuracy_of([u.name if n == w.name else n for n in names])
        aw = profile.path_accuracy_of([w.name if n == u.name else n for n in names])
        no_worse, better = no_worse and aw >= au, better or aw > au
    return no_worse, better


def dominated_variants(profile: PipelineProfile, budget_ms: float, quantile: str) -> set[str]:
    """Variants no better than another of the same task in every respect: accuracy
    (including every measured path accuracy through them), fan-out to every child
    (downstream load) and latency/throughput at every batch size.
    The planner never uses them (replacing one by its dominator never hurts)."""
    out: set[str] = set()
    for t in profile.tasks:
        cands = {v.name: [(v.latency(b, quantile), v.throughput_qps(b, quantile))
                          for b in candidate_batches(v, budget_ms, quantile)] for v in t.variants}
        for u in t.variants:
            for w in t.variants:
                if w.name == u.name or w.name in out:
                    continue
                no_worse, more_accurate = _accuracy_order(profile, u, w)
                if not no_worse:
                    continue
                if any(t.fan_out[w.name][c] > t.fan_out[u.name][c] for c in t.children):
                    continue
                cu, cw = cands[u.name], cands[w.name]
                if cu and not cw:
                    continue
                covers = all(any(lw <= lu and tw >= tu for lw, tw in cw) for lu, tu in cu)
                strict = (more_accurate
                          or any(t.fan_out[w.name][c] < t.fan_out[u.name][c] for c in t.children)
                          or not cu
                          or any(not any(lu <= lw and tu >= tw for lu, tu in cu) for lw, tw in cw))
                if covers and (strict or w.name < u.name):
                    out.add(u.name)
                    break
    return out


class PlanningModel:
    """Configurations, buckets, sparse matrices and the compiled-once CVXPY problem."""

    def __init__(self, profile: PipelineProfile, slo_ms: float, quantile: str = "p95",
                 integer: bool = False, leaf_pruning: bool = True) -> None:
        if quantile not in ("p50", "p95"):
            raise ValueError(f"latency quantile must be 'p50' or 'p95', got {quantile!r}")
        self.profile, self.slo_ms, self.quantile = profile, float(slo_ms), quantile
        self.integer, self.budget_ms = integer, float(slo_ms) / 2.0
        self.chains = profile.chains()
        self.dominated = dominated_variants(profile, self.budget_ms, quantile)
        self.tasks = [t.name for t in profile.tasks]
        self.nonleaf_tasks = {t.name for t in profile.tasks if t.children}
        self._max_accuracy: float | None = None
        self.last = SolveInfo()
        self._build_configs(leaf_pruning)
        self._build_matrices()
        self._build_problem()

    # -- enumeration -----------------------------------------------------------------
    def _build_configs(self, leaf_pruning: bool) -> None:
        prof, q, budget = self.profile, self.quantile, self.budget_ms
        cand: dict[str, list[int]] = {}
        min_lat: dict[str, float] = {}
        for t in prof.tasks:
            lats = []
            for v in t.variants:
                if v.name in self.dominated:
                    continue
                cand[v.name] = candidate_batches(v, budget, q)
                lats += [v.latency(b, q) for b in cand[v.name]]
            min_lat[t.name] = min(lats) if lats else float("inf")
        bucket_index: dict[tuple[str, str, int], int] = {}
        buckets: list[Bucket] = []

        def bucket(t: str, v: VariantProfile, b: int) -> int:
            key = (t, v.name, b)
            if key not in bucket_index:
                bucket_index[key] = len(buckets)
                buckets.append(Bucket(t, v.name, b, v.latency(b, q), v.throughput_qps(b, q)))
            return bucket_index[key]

        configs: list[Config] = []
        # leaf batches worth having: the fastest fitting one for some prefix. Every prefix
        # may use all of them that fit, so a replica placed for a tight prefix also
        # serves looser ones (no fragmentation of leaf replicas by prefix).
        best_leaf: dict[str, set[int]] = {}
        for ci, chain in enumerate(self.chains * 2 if leaf_pruning else self.chains):
            second_pass = ci >= len(self.chains)
            ci = ci % len(self.chains)
            if second_pass and ci == 0:
                configs.clear()
            rest = [sum(min_lat[t] for t in chain[i:]) for i in range(len(chain) + 1)]
            n = len(chain)

            def walk(i: int, vs: tuple, bs: tuple, bks: tuple, mult: tuple, lat: float, acc: float) -> None:
                t = prof.task(chain[i])
                m = 1.0 if i == 0 else mult[-1] * prof.task(chain[i - 1]).fan_out[vs[-1]][chain[i]]
                for v in t.variants:
                    if v.name in self.dominated:
                        continue
                    fits = [b for b in cand[v.name] if lat + v.latency(b, q) + rest[i + 1] <= budget + 1e-9]
                    if not fits:
                        continue
                    if i == n - 1 and leaf_pruning:
                        top = max(fits, key=lambda b: (v.throughput_qps(b, q), -b))
                        best_leaf.setdefault(v.name, set()).add(top)
                        fits = [b for b in fits if b in best_leaf[v.name]]
                    for b in fits:
                        k = (vs + (v.name,), bs + (b,), bks + (bucket(t.name, v, b),), mult + (m,))
                        a = acc * v.accuracy
                        if i == n - 1:
                            a = prof.path_accuracy.get("/".join(k[0]), a)
                            configs.append(Config(ci, *k, accuracy=a))
                        else:
                            walk(i + 1, *k, lat + v.latency(b, q), a)

            walk(0, (), (), (), (), 0.0, 1.0)
        self.buckets, self.bucket_index, self.configs = buckets, bucket_index, configs
        self.variants = sorted({(b.task, b.variant) for b in buckets})

    # -- sparse data -----------------------------------------------------------------
    def _build_matrices(self) -> None:
        K, B, C = len(self.configs), len(self.buckets), len(self.chains)
        self.ref_chain = {t: next(ci for ci, ch in enumerate(self.chains) if t in ch) for t in self.tasks}
        # load on bucket = sum over configs of the task's reference chain of x_k * mult
        rows, cols, vals = [], [], []
        for k, c in enumerate(self.configs):
            for i, t in enumerate(self.chains[c.chain]):
                if self.ref_chain[t] == c.chain:
                    rows.append(c.buckets[i]); cols.append(k); vals.append(c.mult[i])
        self.L = sp.csr_matrix((vals, (rows, cols)), shape=(B, K))
        self.S = sp.csr_matrix((np.ones(K), ([c.chain for c in self.configs], np.arange(K))), shape=(C, K))
        # branch consistency: for every task with >= 2 children, the flow through every
        # prefix (variants and batches down to that task) is equal on all its branches.
        rows, cols, vals, nrow = [], [], [], 0
        for t in self.tasks:
            kids = self.profile.task(t).children
            if len(kids) < 2:
                continue
            reps = [next(ci for ci, ch in enumerate(self.chains) if t in ch and ch[ch.index(t) + 1] == kid)
                    for kid in kids]
            depth = self.chains[reps[0]].index(t) + 1
            groups: dict[tuple, dict[int, list[int]]] = {}
            for k, c in enumerate(self.configs):
                if c.chain in reps:
                    groups.setdefault(c.buckets[:depth], {}).setdefault(c.chain, []).append(k)
            for per_chain in groups.values():
                for other in reps[1:]:
                    for k in per_chain.get(reps[0], []):
                        rows.append(nrow); cols.append(k); vals.append(1.0)
                    for k in per_chain.get(other, []):
                        rows.append(nrow); cols.append(k); vals.append(-1.0)
                    nrow += 1
        self.E = sp.csr_matrix((vals, (rows, cols)), shape=(nrow, K)) if nrow else None
        self.acc = np.array([c.accuracy for c in self.configs]) / max(C, 1)
        self.thr = np.array([b.thr_qps for b in self.buckets])
        tix = {t: i for i, t in enumerate(self.tasks)}
        self.T = sp.csr_matrix((np.ones(B), ([tix[b.task] for b in self.buckets], np.arange(B))),
                               shape=(len(self.tasks), B))
        vix = {v: i for i, v in enumerate(self.variants)}
        self.G = sp.csr_matrix((np.ones(B), ([vix[(b.task, b.variant)] for b in self.buckets], np.arange(B))),
                               shape=(len(self.variants), B))
        self.variant_accuracy = np.array([self.profile.task(t).variant(v).accuracy for t, v in self.variants])
        # non-leaf buckets: one batch size per non-leaf variant
        self.nl = np.array([i for i, b in enumerate(self.buckets) if b.task in self.nonleaf_tasks], dtype=int)
        nl_vars = sorted({(self.buckets[i].task, self.buckets[i].variant) for i in self.nl})
        nvix = {v: j for j, v in enumerate(nl_vars)}
        self.H = sp.csr_matrix((np.ones(len(self.nl)),
                                ([nvix[(self.buckets[i].task, self.buckets[i].variant)] for i in self.nl],
                                 np.arange(len(self.nl)))), shape=(len(nl_vars), len(self.nl)))

    # -- the problem -----------------------------------------------------------------
    def _build_problem(self) -> None:
        K, B, V, T = len(self.configs), len(self.buckets), len(self.variants), len(self.tasks)
        P = cp.Parameter
        self.p = {
            "demand": P(nonneg=True, value=0.0), "n_workers": P(nonneg=True, value=0.0),
            "served_floor": P(nonneg=True, value=0.0), "ratio_floor": P(nonneg=True, value=0.0),
            "w_served": P(nonneg=True, value=1.0), "w_acc": P(nonneg=True, value=0.0),
            "w_workers": P(nonneg=True, value=0.0),
            "w_variant": P(V, nonneg=True, value=np.zeros(V)),   # tie-break per replica of a variant
            "swap_w": P(V, nonneg=True, value=np.zeros(V)), "prev": P(V, nonneg=True, value=np.zeros(V)),
            "r_lb": P(B, nonneg=True, value=np.zeros(B)), "r_ub": P(B, nonneg=True, value=np.zeros(B)),
            "task_cap": P(T, nonneg=True, value=np.zeros(T)), "task_min": P(T, nonneg=True, value=np.zeros(T)),
            "y_ub": P(len(self.nl), nonneg=True, value=np.ones(len(self.nl))),
        }
        p = self.p
        x = cp.Variable(K, nonneg=True, name="x")
        r = cp.Variable(B, integer=self.integer, name="r")
        served = cp.Variable(name="served")
        u = cp.Variable(V, nonneg=True, name="swaps")
        self.x, self.r, self.served, self.u = x, r, served, u
        accmass = self.acc @ x
        cons = {
            "served_le_demand": served <= p["demand"],
            "served_floor": served >= p["served_floor"],
            "every_chain_serves": self.S @ x == served * np.ones(len(self.chains)),
            "capacity": self.L @ x <= cp.multiply(self.thr, r),
            "cluster": cp.sum(r) <= p["n_workers"],
            "task_cap": self.T @ r <= p["task_cap"],
            "task_min": self.T @ r >= p["task_min"],
            "r_lb": r >= p["r_lb"], "r_ub": r <= p["r_ub"],
            "accuracy_floor": accmass >= p["ratio_floor"] * served,
            "swaps": u >= self.G @ r - p["prev"],
        }
        if self.E is not None:
            cons["branches_agree"] = self.E @ x == 0
        if len(self.nl):
            y = cp.Variable(len(self.nl), boolean=self.integer, name="y")
            self.y = y
            cons.update({
                "y_range": y >= 0, "y_ub": y <= p["y_ub"],
                "one_batch_per_variant": self.H @ y <= 1,
                "batch_link": r[self.nl] <= p["n_workers"] * y,
            })
        else:
            self.y = None
        self.constraints = cons
        self.accmass = accmass
        obj = (p["w_served"] * served + p["w_acc"] * accmass - p["w_workers"] * cp.sum(r)
               - p["w_variant"] @ (self.G @ r) - p["swap_w"] @ u)
        self.problem = cp.Problem(cp.Maximize(obj), list(cons.values()))
        assert self.problem.is_dcp(dpp=True)

    @property
    def max_accuracy(self) -> float:
        """Highest expected accuracy any split reaches with unlimited workers (branches
        share their upstream variants, so it can be below the mean of per-chain maxima)."""
        if self._max_accuracy is None:
            saved = {k: p.value for k, p in self.p.items()}
            big, B, T = 1e9, len(self.buckets), len(self.tasks)
            self.set(demand=1.0, n_workers=big, served_floor=1.0, ratio_floor=0.0, w_served=0.0, w_acc=1.0,
                     w_workers=0.0, w_variant=np.zeros(len(self.variants)), swap_w=np.zeros(len(self.variants)),
                     r_lb=np.zeros(B), r_ub=np.full(B, big), task_cap=np.full(T, big), task_min=np.zeros(T),
                     y_ub=np.ones(len(self.nl)))
            status = self.run(SolveLimits(node_limit=100_000, time_limit_s=120.0), 1e-6) \
                if self.configs else "infeasible"
            ok = status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and self.accmass.value is not None
            self._max_accuracy = float(self.accmass.value) if ok else 0.0
            self.set(**saved)
        return self._max_accuracy

    def set(self, **values) -> None:
        for k, v in values.items():
            self.p[k].value = v

    def run(self, limits: "SolveLimits", mip_rel_gap: float) -> str:
        """Solve with the current parameters; return the cvxpy status.

        The work is bounded by ``limits``' node and iteration counts, which do not depend
        on the machine's speed, and never warm-started from the previous solve of this
        cached model (HiGHS would start from that incumbent, so a result would depend on
        what was solved before). The wall-clock limit is a safety net that results are
        not meant to reach; ``self.last`` says whether it was hit."""
        self.last = SolveInfo()
        try:
            with warnings.catch_warnings():   # "solution may be inaccurate": the status says so
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=cp.HIGHS, warm_start=False, output_flag=False,
                                   time_limit=float(limits.time_limit_s),
                                   mip_max_nodes=int(limits.node_limit),
                                   simplex_iteration_limit=int(limits.iteration_limit),
                                   mip_rel_gap=float(mip_rel_gap), threads=1, random_seed=0,
                                   enforce_dpp=True)
        except (cp.error.SolverError, IndexError, ValueError) as exc:
            # solver crashed, or cvxpy failed to unpack an empty solution (seen with HiGHS
            # on infeasible MILPs): the caller keeps the old plan
            return f"solver_error: {exc!r}"
        stats = self.problem.solver_stats
        info = getattr(stats, "extra_stats", None)
        self.last = SolveInfo(
            seconds=float(stats.solve_time or 0.0),
            nodes=int(getattr(info, "mip_node_count", 0) or 0),
            iterations=int(getattr(info, "simplex_iteration_count", 0) or 0),
            time_limit_hit=(float(stats.solve_time or 0.0) >= 0.99 * float(limits.time_limit_s)))
        return str(self.problem.status)
