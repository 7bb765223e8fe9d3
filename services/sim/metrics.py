"""Per-request outcomes and time series of one simulation run (brief section 5).

A request fails if ANY of its sub-queries is dropped or it finishes after its deadline:
SLO violation ratio = (late + dropped + shed + errors) / requests. Effective accuracy =
mean path accuracy of the requests answered in time, where a request's path accuracy
is the mean over the chains it reached of the product, along the chain, of the mean
accuracy of the variants its queries ran on (a chain is reached when at least one
query got to its leaf; a frame with no detected faces does not reach the face chain).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OK, LATE, DROPPED, SHED = 1, 2, 3, 4
STATUS_NAMES = {OK: "ok", LATE: "late", DROPPED: "dropped", SHED: "shed"}


@dataclass
class SimResult:
    policy: str
    pipeline: str
    n_workers: int
    arrival_s: np.ndarray          # per request
    status: np.ndarray             # per request: OK / LATE / DROPPED / SHED
    accuracy: np.ndarray           # per request (NaN unless OK)
    latency_s: np.ndarray          # per request (NaN if dropped or shed)
    series: dict[str, np.ndarray]  # per control tick: t, demand_est, active, planned_accuracy
    variant_mix: dict[str, np.ndarray] = field(default_factory=dict)   # variant -> workers per tick
    queries: int = 0               # simulated (sub-)queries: created at any stage
    queries_dropped: int = 0
    batches: int = 0
    plans: int = 0
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return int(self.status.size)

    def count(self, status: int) -> int:
        return int(np.count_nonzero(self.status == status))

    @property
    def violation_ratio(self) -> float:
        return 1.0 - self.count(OK) / self.requests if self.requests else 0.0

    @property
    def effective_accuracy(self) -> float:
        ok = self.status == OK
        return float(np.mean(self.accuracy[ok])) if ok.any() else float("nan")

    @property
    def mean_active_workers(self) -> float:
        a = self.series.get("active")
        return float(np.mean(a)) if a is not None and a.size else float("nan")

    @property
    def queries_per_wall_s(self) -> float:
        return self.queries / self.wall_s if self.wall_s > 0 else float("nan")

    def binned(self, bin_s: float = 1.0) -> dict[str, np.ndarray]:
        """Per arrival bin: demand (req/s), violation ratio, effective accuracy, goodput."""
        if not self.requests:
            return {k: np.zeros(0) for k in ("t", "demand", "violations", "accuracy", "goodput")}
        idx = (self.arrival_s // bin_s).astype(np.int64)
        n = int(idx.max()) + 1
        total = np.bincount(idx, minlength=n).astype(float)
        ok = self.status == OK
        good = np.bincount(idx[ok], minlength=n).astype(float)
        accsum = np.bincount(idx[ok], weights=self.accuracy[ok], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            viol = np.where(total > 0, 1.0 - good / total, np.nan)
            acc = np.where(good > 0, accsum / np.maximum(good, 1), np.nan)
        return {"t": np.arange(n) * bin_s, "demand": total / bin_s, "violations": viol, "accuracy": acc,
                "goodput": good / bin_s}

    def summary(self) -> dict:
        lat = self.latency_s[self.status == OK]
        return {
            "policy": self.policy, "pipeline": self.pipeline, "workers": self.n_workers,
            "requests": self.requests, "ok": self.count(OK), "late": self.count(LATE),
            "dropped": self.count(DROPPED), "shed": self.count(SHED),
            "violation_ratio": self.violation_ratio, "effective_accuracy": self.effective_accuracy,
            "mean_active_workers": self.mean_active_workers,
            "p99_latency_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
            "queries": self.queries, "plans": self.plans, "wall_s": self.wall_s,
            "queries_per_wall_s": self.queries_per_wall_s,
        }
