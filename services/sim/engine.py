"""The event loop: requests, workers, routers and the controller on a simulated clock.

Events live on a heap of ``(time, priority, sequence, kind, payload)`` with an
``itertools.count()`` tie-break (SimPy style), so a run is a pure function of its
inputs and seed. Arrivals come from a sorted array and are merged with the heap
(events at the same time go first). One event per batch completion, model load and
control tick; queries travel as groups (the sub-queries of one request that a router
sends to one worker in one message), counted one by one by the batching rule.

What runs here is the services' policy code (``services.policy``), the same functions
with the same state: ``EdfQueue.take_batch`` (the batching rule and early dropping),
``ServiceTimeEstimator.seeded`` (each worker's batch-time estimate, seeded from the
plan's latency figures as the worker does), ``downstream_reserves`` (the reserve rule
the routers use), ``TokenBucket`` admission, ``DemandEstimator`` (the controller's
demand estimate), ``StageRouting`` (MostAccurateFirst with the routers' rate meter),
``reroute_choice`` and the policy's planner (``PlannerPolicy`` for ours, which also
calibrates the profile from the batch times the simulated workers report each tick). What is modelled: batch execution time drawn per batch from the
profile (log-normal with the profile's p50 as median and p95 as 95th percentile),
per-query fan-out by the brief's integer recipe ``floor((i+1)m) - floor(im)`` over the
i-th query a variant processes, model swaps as the worker does them (a worker that
changes variant within its task keeps serving with the old model, new arrivals
included, while the new one loads for ``load_s``; one that moves to another task
serves nothing until its model is loaded), and a transport that takes no time.

Workers sharing a device: with a ``sharing`` table in the profile
(:mod:`services.planner.sharing`, measured by ``python -m services.tools.sharing``), a
batch that starts while k workers on its device run batches (itself included) takes the
measured factor at k times its drawn time, fixed at its start; ``workers_per_device``
says which workers share one (None: all of them). Without a table, ``cores`` models
processor sharing, an assumption (max(1, k / cores)); without either, no contention.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from services.common.plan import Plan
from services.planner.profile import PipelineProfile
from services.planner.sharing import factor as sharing_factor
from services.policy.admission import TokenBucket
from services.policy.batching import EdfQueue, ServiceTimeEstimator, burst_batch, overrun
from services.policy.calibration import Timing
from services.policy.demand import DemandEstimator, DemandReporter
from services.policy.rates import RATE_TAU_S
from services.policy.reserve import downstream_reserves
from services.policy.routing import DEFAULT_FILL, REROUTE_SLACK, StageRouting, expected_finish_s, reroute_choice
from services.sim.metrics import DROPPED, LATE, OK, SHED, SimResult
from services.sim.policies import Decision, Observation, Policy, worker_ids

BATCH, SWAP, TICK, HOP, PLAN = 0, 1, 2, 3, 4
Z95 = 1.6448536269514722


@dataclass(frozen=True)
class SimConfig:
    n_workers: int = 20
    seed: int = 0
    slo_ms: float | None = None         # default: the profile's SLO
    control_period_s: float = 1.0       # controller loop: demand estimate, re-plan check, sampling
    load_s: float = 1.0                 # model load time when the profile has no load_s
    latency_jitter: bool = True         # False: every batch takes exactly its p50
    rate_tau_s: float = RATE_TAU_S      # time constant of the routers' per-path rate (MostAccurateFirst)
    route_fill: float = DEFAULT_FILL    # MostAccurateFirst's utilisation cap per worker
    # transport: each router -> worker dispatch reaches the worker's queue this much later
    # (a stage's hop: the message, the router's work and the result's way back; measured on
    # the real routers by bench/bench_breakdown.py). 0: instantaneous.
    hop_s: float = 0.0
    # -- what a live cluster adds (docs/simulator.md, "The live model"); the defaults are
    # the ideal cluster ``make reproduce`` runs, ``python -m services.sim run`` turns them on
    # front doors publish their cumulative request count every ``report_s`` (at
    # ``report_phase_s + k * report_s``) and the controller's estimator reads the last
    # report at its tick, as ``read_demand`` does; None: the exact count at every tick
    report_s: float | None = None
    report_phase_s: float = 0.5
    # with ``report_s``: the front door also reports early when its arrivals jump, checked
    # this often (``DemandReporter``, as the live front door does); None: only periodic reports
    report_check_s: float | None = None
    ingress_s: float = 0.0        # per request: client -> front door -> first stage's routing
    egress_s: float = 0.0         # per request: the answer's way back to the client
    plan_delay_s: float = 0.0     # a decision reaches routers and workers this much later (solve, publish)
    cold_start: bool = False      # the controller starts with no demand seen (plans for its minimum)
    # cores shared by the workers: a batch that starts while k workers run batches takes
    # max(1, k / cores) times its drawn time (1 intra-op thread each); None: no contention
    cores: float | None = None
    # with a sharing table in the profile: most workers on one device (None: every worker shares one)
    workers_per_device: int | None = None
    # a parked worker frees its model this long after the plan parked it, unless the plan
    # names that model as its standby (the worker's --linger-s); a plan that brings it back
    # later loads its model again, or finds its standby (Plan.standby) warm once that has
    # loaded. None: a parked worker keeps its model (the ideal cluster)
    park_linger_s: float | None = None


class _Variant:
    """Per-run tables of one (task, variant): latency by batch size, fan-out counters."""

    __slots__ = ("name", "task", "ti", "acc", "p50", "sig", "children", "counts", "load_s", "maxb", "share")

    def __init__(self, v, ti: int, children: list[tuple[int, float]], load_s: float,
                 share: list[float] | None = None) -> None:
        self.name, self.task, self.ti, self.acc = v.name, v.task, ti, v.accuracy
        top = max(v.latency_ms)
        self.maxb = top
        self.p50 = [0.0] * (top + 1)
        self.sig = [0.0] * (top + 1)
        known = sorted(v.latency_ms)
        for b in range(1, top + 1):
            k = next(x for x in known if x >= b)        # a missing size costs the next profiled one
            p = v.latency_ms[k]
            self.p50[b] = p.p50_ms / 1000.0
            self.sig[b] = math.log(p.p95_ms / p.p50_ms) / Z95 if p.p95_ms > p.p50_ms else 0.0
        self.children = children
        self.counts = [0] * len(children)
        self.load_s = load_s if v.load_s is None else v.load_s
        self.share = share            # latency factor by busy workers on its device (None: no table)



class _Worker:
    __slots__ = ("wid", "var", "maxb", "queue", "est", "reserve", "busy", "busy_until", "ready_at",
                 "draining", "active", "gen", "pending", "burst", "burst_est", "dev", "held_until", "standby")

    def __init__(self, wid: str, dev: int = 0) -> None:
        self.wid = wid
        self.dev = dev                # index of the device it shares (with a sharing table)
        self.var: _Variant | None = None
        self.maxb = 1
        self.queue = None
        self.est = None
        self.reserve = 0.0
        self.busy = False
        self.busy_until = 0.0
        self.ready_at = 0.0
        self.draining: list = []      # (queue, variant, max batch, estimator) of earlier variants
        self.active = False
        self.gen = 0
        self.pending = None           # (variant, max batch, estimator) loading while the current one serves
        self.burst: _Variant | None = None   # the plan's burst variant for this worker's task
        self.burst_est = None
        self.held_until = math.inf    # parked: its model is freed at this time (park_linger_s)
        self.standby: tuple[_Variant, float] | None = None   # parked: (standby variant, ready at)

    def expected_finish(self, now: float, extra: int) -> float:
        """When ``extra`` more queries would be done here (p50 batches, no jitter)."""
        b = self.maxb
        waiting = self.queue.queued + extra + sum(d[0].queued for d in self.draining)
        return expected_finish_s(max(now, self.busy_until, self.ready_at), waiting, b, self.est(b))


def simulate(profile: PipelineProfile, arrivals_s: np.ndarray, policy: Policy,
             config: SimConfig = SimConfig()) -> SimResult:
    """Run ``policy`` on ``arrivals_s`` (sorted seconds) over a pool of
    ``config.n_workers`` workers. Deterministic for ``config.seed``."""
    return _Sim(profile, np.asarray(arrivals_s, dtype=float), policy, config).run()


class _Sim:
    def __init__(self, profile: PipelineProfile, arrivals: np.ndarray, policy: Policy, cfg: SimConfig) -> None:
        if arrivals.size and np.any(np.diff(arrivals) < 0):
            raise ValueError("arrivals must be sorted")
        self.profile, self.arr, self.policy, self.cfg = profile, arrivals, policy, cfg
        self.slo = (cfg.slo_ms if cfg.slo_ms is not None else profile.slo_ms) / 1000.0
        self.reroute_slack = REROUTE_SLACK * self.slo
        self.hop = float(cfg.hop_s)
        self.egress = float(cfg.egress_s)
        self.cores = cfg.cores
        self.park_linger_s = cfg.park_linger_s
        self.running = 0              # workers running a batch (for ``cores``)
        if cfg.workers_per_device is not None and cfg.workers_per_device < 1:
            raise ValueError(f"workers_per_device must be >= 1, got {cfg.workers_per_device}")
        per_dev = cfg.workers_per_device or max(cfg.n_workers, 1)
        self.running_on = [0] * (-(-max(cfg.n_workers, 1) // per_dev))   # the same, per device
        self.latest: Plan | None = None   # the newest plan decided (applied or on its way)
        self.tasks = [t.name for t in profile.tasks]
        tix = {t: i for i, t in enumerate(self.tasks)}
        self.chains = [tuple(tix[t] for t in c) for c in profile.chains()]
        self.children = [[tix[c] for c in t.children] for t in profile.tasks]
        self.variants: dict[tuple[str, str], _Variant] = {}
        for t in profile.tasks:
            for v in t.variants:
                ch = [(tix[c], float(t.fan_out[v.name][c])) for c in t.children]
                table = profile.sharing.get(v.device or profile.device)
                share = None if table is None else [sharing_factor(table, k) for k in range(per_dev + 1)]
                self.variants[(t.name, v.name)] = _Variant(v, tix[t.name], ch, cfg.load_s, share)
        self.workers = {w: _Worker(w, i // per_dev) for i, w in enumerate(worker_ids(cfg.n_workers))}
        self.rng = np.random.default_rng(cfg.seed)
        self._u: list[float] = []
        self._ui = 0
        self._z: list[float] = []
        self._zi = 0
        self.heap: list = []
        self.seq = itertools.count()
        self.cancel = getattr(policy, "cancel_failed", False)
        self.spill = getattr(policy, "spill", False)
        self.spilled = 0              # batches run on a burst variant
        self.mkqueue = EdfQueue
        self.tree = {t.name: tuple(t.children) for t in profile.tasks}
        self.timings: dict[tuple[str, str, int], list] = {}   # batches since the last tick
        n = arrivals.size
        self.deadline = (arrivals + self.slo).tolist()
        self.pend = [0] * n
        self.fail = [0] * n
        self.status = np.zeros(n, dtype=np.int8)
        self.acc = np.full(n, np.nan)
        self.lat = np.full(n, np.nan)
        nt = len(self.tasks)
        self.sacc = [[0.0] * n for _ in range(nt)]
        self.scnt = [[0] * n for _ in range(nt)]
        self.bucket = TokenBucket(None)
        self.plan: Plan | None = None
        self.planned: dict = {}
        self.stages = [StageRouting(t, cfg.route_fill, cfg.rate_tau_s) for t in self.tasks]
        self.task_count = [0] * nt
        # the controller's estimator with its defaults (services/policy/demand.py)
        self.root_est = DemandEstimator()
        self._reporter = DemandReporter(cfg.report_s or 1.0)
        self._next_check = cfg.report_phase_s
        self.task_est = [DemandEstimator() for _ in range(nt)]
        self.queries = self.dropped_q = self.batches = self.plans = 0
        self.inflight = 0
        self.ticks: dict[str, list] = {"t": [], "demand_est": [], "active": [], "planned_accuracy": []}
        self.mix: dict[str, list] = {}
        self.planned_accuracy = float("nan")

    # -- random numbers, drawn in chunks (deterministic for the seed) ---------------
    def u(self) -> float:
        if self._ui >= len(self._u):
            self._u = self.rng.random(1 << 15).tolist()
            self._ui = 0
        self._ui += 1
        return self._u[self._ui - 1]

    def exec_time(self, v: _Variant, size: int) -> float:
        if not self.cfg.latency_jitter:
            return v.p50[size]
        if self._zi >= len(self._z):
            self._z = self.rng.standard_normal(1 << 14).tolist()
            self._zi = 0
        z = self._z[self._zi]
        self._zi += 1
        return v.p50[size] * math.exp(v.sig[size] * z)

    # -- plans -------------------------------------------------------------------
    def _observation(self, now: float) -> Observation:
        task_qps = {t: self.task_est[i].estimate for i, t in enumerate(self.tasks)}
        current = self.latest if self.latest is not None else self.plan
        return Observation(now, self.root_est.estimate, task_qps, current, self.cfg.n_workers)

    def _reserves(self, plan: Plan) -> list[float]:
        """The downstream reserve of every task under ``plan``: the routers' rule
        (``services.policy.reserve``) on the plan's latency figures."""
        r = downstream_reserves(self.tree, plan.fastest_s())
        return [r[t] for t in self.tasks]

    def apply(self, d: Decision, now: float, initial: bool = False) -> None:
        plan = d.plan
        self.plan, self.planned = plan, dict(d.planned_qps)
        self.plans += 1
        self.bucket.set_rate(d.admission_qps)
        self.planned_accuracy = d.expected_accuracy if d.expected_accuracy is not None else float("nan")
        reserves = self._reserves(plan)
        early = self.policy.early_drop
        for wid, w in self.workers.items():
            a = plan.workers.get(wid)
            if a is None:
                self._park(w, plan.standby.get(wid), now, initial)
                continue
            v = self.variants[(a.task, a.variant)]
            if not w.active and not initial and self._rejoin(plan, a, w, v, now, reserves[v.ti] if early else -math.inf):
                continue
            w.active = True
            w.reserve = reserves[v.ti] if early else -math.inf
            maxb = min(a.batch_size, v.maxb)
            if w.pending is not None and w.pending[0] is v:    # already loading it
                w.pending = (v, maxb, w.pending[2])
                continue
            if w.var is v:
                if w.pending is not None:    # back to the variant it still runs: cancel the load
                    w.pending = None
                    w.gen += 1
                w.maxb = maxb
                continue
            if not initial and w.var is not None and w.var.ti == v.ti and now >= w.ready_at:
                # the worker's hot swap (services/worker/core.py): the new variant loads
                # while the old one keeps serving, queries arriving meanwhile included
                w.pending = (v, maxb, self._estimator(plan, a))
                w.gen += 1
                self.push(now + v.load_s, SWAP, (w, w.gen))
                continue
            w.pending = None
            if w.var is not None and (w.queue.queued or w.draining):
                w.draining.append((w.queue, w.var, w.maxb, w.est))
            w.var, w.maxb, w.queue, w.est = v, maxb, self.mkqueue(), self._estimator(plan, a)
            w.gen += 1
            w.ready_at = now if initial else now + v.load_s
            if not initial:
                self.push(w.ready_at, SWAP, (w, w.gen))
        if self.spill:
            for wid, w in self.workers.items():
                a = plan.workers.get(wid)
                b = self.variants.get((a.task, plan.burst[a.task])) if a is not None and a.task in plan.burst else None
                if b is not None and b.name == a.variant:
                    b = None
                if b is not w.burst:
                    w.burst = b
                    w.burst_est = ServiceTimeEstimator.seeded(
                        {s: b.p50[s] for s in range(1, b.maxb + 1)}) if b is not None else None
        self.by_task = [[] for _ in self.tasks]
        for wid in sorted(plan.workers):
            self.by_task[self.workers[wid].var.ti].append(self.workers[wid])
        accuracy = plan.worker_accuracy or \
            {wid: self.variants[(a.task, a.variant)].acc for wid, a in plan.workers.items()}
        planned: dict[str, dict[str, float]] = {}
        for (task, path), q in self.planned.items():
            planned.setdefault(task, {})[path] = q
        for ti, task in enumerate(self.tasks):
            self.stages[ti].set_plan(plan.routing.get(task, {}), planned.get(task, {}), accuracy)
        for w in self.workers.values():
            if not w.busy:
                self.start(w, now)

    def _park(self, w: _Worker, standby: str | None, now: float, initial: bool) -> None:
        """The plan parks ``w``: its model is freed ``park_linger_s`` after it parked
        unless ``standby`` names that model; a standby it does not hold loads meanwhile."""
        was_active = w.active
        w.active = False
        if self.park_linger_s is None:
            return
        if was_active or initial:
            w.held_until = now + self.park_linger_s
        if standby is None:
            w.standby = None
            return
        v = self.variants.get(tuple(standby.split("/", 1)))
        if v is None or (w.standby is not None and w.standby[0] is v):
            return
        if w.var is v and now < w.held_until:
            w.held_until, w.standby = math.inf, None     # it keeps the model it has
        else:
            w.standby = (v, now + v.load_s)

    def _rejoin(self, plan: Plan, a, w: _Worker, v: _Variant, now: float, reserve: float) -> bool:
        """A parked ``w`` comes back on ``v``. With the live model's model freeing: from its
        standby (ready when that load ends) or, if it freed what it had, after a full load
        (True: done here); otherwise (it still holds its model) the caller's usual path."""
        if self.park_linger_s is None:
            return False
        standby, w.standby = w.standby, None
        if standby is not None and standby[0] is v:
            ready = max(now, standby[1])
        elif w.var is not None and now < w.held_until:
            w.held_until = math.inf
            return False
        else:
            ready = now + v.load_s
        w.held_until = math.inf
        w.active, w.reserve, w.pending = True, reserve, None
        if w.var is not None and (w.queue.queued or w.draining):
            w.draining.append((w.queue, w.var, w.maxb, w.est))
        w.var, w.maxb, w.queue, w.est = v, min(a.batch_size, v.maxb), self.mkqueue(), self._estimator(plan, a)
        w.gen += 1
        w.ready_at = ready
        if ready > now:
            self.push(ready, SWAP, (w, w.gen))
        return True

    def switch(self, w: _Worker) -> None:
        """A hot swap completes: the loaded variant takes over; what the old one had
        queued still runs on it (drained first)."""
        v, maxb, est = w.pending
        w.pending = None
        if w.queue.queued:
            w.draining.append((w.queue, w.var, w.maxb, w.est))
        w.var, w.maxb, w.queue, w.est = v, maxb, self.mkqueue(), est

    @staticmethod
    def _estimator(plan: Plan, a) -> ServiceTimeEstimator:
        """The worker's estimate for a newly loaded variant: seeded from the plan's figures."""
        by_batch = plan.latency_ms.get(a.task, {}).get(a.variant)
        return ServiceTimeEstimator.seeded({b: ms / 1000.0 for b, ms in by_batch.items()} if by_batch else None)

    # -- events ------------------------------------------------------------------
    def push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), kind, payload))

    def start(self, w: _Worker, now: float) -> None:
        """A free worker takes its next batch: earlier variants' queues first, then its
        own once its model is loaded."""
        while w.draining:
            q, v, maxb, est = w.draining[0]
            if q.queued:
                if self._take(w, q, v, maxb, est, now):
                    return
                continue
            w.draining.pop(0)
        if w.var is None or now < w.ready_at or not w.queue.queued:
            return
        q, b = w.queue, w.burst
        if b is not None and q.queued > w.maxb and b.ti == w.var.ti and overrun(
                now, q.queued, w.maxb, w.est(w.maxb), q.peek_deadline(), q.last_deadline, w.reserve):
            self.spilled += 1
            self._take(w, q, b, burst_batch(b.p50, b.maxb, w.est(w.maxb)), w.burst_est, now)
            return
        self._take(w, q, w.var, w.maxb, w.est, now)

    def _take(self, w, q, v, maxb, est, now) -> bool:
        batch, dropped = q.take_batch(now, maxb, est)
        if self.cancel and batch:
            fail = self.fail
            if any(fail[item[0]] for item, _ in batch):
                # request-level dropping: a sub-query of a request that already failed
                # is worthless; discard it instead of running it
                dropped = dropped + [(item, n) for item, n in batch if fail[item[0]]]
                batch = [(item, n) for item, n in batch if not fail[item[0]]]
        if dropped:
            fail, pend = self.fail, self.pend
            for (r, _), n in dropped:
                self.dropped_q += n
                if not fail[r]:
                    fail[r] = DROPPED
                pend[r] -= n
                if pend[r] == 0:
                    self.finish(r, now)
        if not batch:
            return bool(q.queued) and self._take(w, q, v, maxb, est, now)
        size = 0
        for _, n in batch:
            size += n
        dur = self.exec_time(v, size)
        busy = self.running_on[w.dev] + 1
        if v.share is not None:
            dur *= v.share[busy]      # measured sharing, fixed at the batch's start
        elif self.cores is not None:
            # processor sharing, fixed at the batch's start: k batches on fewer cores
            dur *= max(1.0, (self.running + 1) / self.cores)
        self.running += 1
        self.running_on[w.dev] = busy
        w.busy = True
        w.busy_until = now + dur
        self.batches += 1
        heapq.heappush(self.heap, (now + dur, BATCH, next(self.seq), BATCH, (w, batch, v, size, dur, est, busy)))
        return True

    def route(self, ti: int, path: str, r: int, k: int, now: float) -> None:
        split = self.stages[ti].split(path, k, self.u)
        if not split:     # the plan does not serve this task: the queries fail
            self.dropped_q += k
            if not self.fail[r]:
                self.fail[r] = DROPPED
            self.pend[r] -= k
            if self.pend[r] == 0:
                self.finish(r, now)
            return
        self.queries += k
        self.task_count[ti] += k
        workers = self.workers
        groups = {workers[wid]: c for wid, c in split.items()}
        deadline = self.deadline[r]
        item = (r, path)
        for w, c in groups.items():
            if self.policy.reroute and w.expected_finish(now + self.hop, c) + w.reserve + self.reroute_slack > deadline:
                w = self._reroute(ti, w, c, now + self.hop, deadline)
            if self.hop:
                self.push(now + self.hop, HOP, (w, item, deadline, c))
                continue
            w.queue.push(item, deadline, w.reserve, c)
            if not w.busy:
                self.start(w, now)

    def _reroute(self, ti: int, w: _Worker, c: int, now: float, deadline: float) -> _Worker:
        """Opportunistic rerouting: a group that would leave less than ``REROUTE_SLACK`` of
        the SLO as slack goes to the worker of the same task (any variant) that finishes it
        first, if that one makes the deadline."""
        finish = {}
        for x in self.by_task[ti]:
            if not x.active:
                continue
            # _Worker.expected_finish inlined, same formula (this loop is most of a 1,000-worker
            # run); tests/unit/test_sim.py checks it against expected_finish
            b = x.maxb
            waiting = x.queue.queued + c
            if x.draining:
                waiting += sum(d[0].queued for d in x.draining)
            start = x.busy_until if x.busy_until > now else now
            if x.ready_at > start:
                start = x.ready_at
            by_size = x.est.by_size      # ServiceTimeEstimator.__call__, inlined
            lat = by_size[b] if b in by_size else x.est.per_item_s * b
            finish[x] = start + -(-waiting // b) * lat
        if w not in finish:
            finish[w] = w.expected_finish(now, c)
        return reroute_choice(w, finish, deadline, w.reserve, self.reroute_slack)

    def on_batch(self, now: float, payload) -> None:
        w, batch, v, size, dur, est, busy = payload
        w.busy = False
        self.running -= 1
        self.running_on[w.dev] -= 1
        est.observe(size, dur)
        tm = self.timings.get((v.task, v.name, size))
        if tm is None:
            tm = self.timings[(v.task, v.name, size)] = [0, 0.0, 0, 0, 0]
        tm[0] += 1
        tm[1] += dur * 1000.0
        tm[4] += busy
        ti, a = v.ti, v.acc
        sacc, scnt = self.sacc[ti], self.scnt[ti]
        pend = self.pend
        children = v.children
        for item, n in batch:
            r = item[0]
            sacc[r] += a * n
            scnt[r] += n
            if children:
                path = item[1]
                cpath = path + "/" + v.name if path else v.name
                counts = v.counts
                for ci, (cti, m) in enumerate(children):
                    c0 = counts[ci]
                    c1 = c0 + n
                    counts[ci] = c1
                    k = math.floor(c1 * m) - math.floor(c0 * m)
                    if k:
                        pend[r] += k
                        self.route(cti, cpath, r, k, now)
            pend[r] -= n
            if pend[r] == 0:
                self.finish(r, now)
        self.start(w, now)

    def finish(self, r: int, now: float) -> None:
        self.inflight -= 1
        f = self.fail[r]
        now += self.egress            # when the client has the answer
        self.lat[r] = now - (self.deadline[r] - self.slo)
        if f:
            self.status[r] = f
            self.lat[r] = np.nan
            return
        if now > self.deadline[r] + 1e-9:   # the client's deadline fired first
            self.status[r] = LATE
            return
        self.status[r] = OK
        total, reached = 0.0, 0
        for ch in self.chains:
            leaf = ch[-1]
            if self.scnt[leaf][r] == 0:
                continue
            p = 1.0
            for t in ch:
                p *= self.sacc[t][r] / self.scnt[t][r]
            total += p
            reached += 1
        self.acc[r] = total / reached if reached else self.sacc[0][r] / max(1, self.scnt[0][r])

    def tick(self, now: float, arrived: int) -> None:
        rs = self.cfg.report_s
        if rs is None:
            self.root_est.observe("frontdoor", arrived + self.root_offset, now)
        elif self.cfg.report_check_s:   # the live front door's reporter, stepped to now
            check = self.cfg.report_check_s
            while self._next_check <= now + 1e-9:
                t = self._next_check
                n = self.received_by(t) + self.root_offset
                if self._reporter.due(t, n):
                    self.root_est.observe("frontdoor", n, t)
                self._next_check = t + check
        else:   # the front door's last report: its count at its own report time
            ts = self.cfg.report_phase_s + math.floor((now - self.cfg.report_phase_s) / rs + 1e-9) * rs
            if ts >= 0.0:
                self.root_est.observe("frontdoor", self.received_by(ts) + self.root_offset, ts)
        self.root_est.update(now)
        for ti, e in enumerate(self.task_est):
            e.observe("router", self.task_count[ti] + self.task_offset[ti], now)
            e.update(now)
        for st in self.stages:
            st.advance(now)
        if self.timings:
            observe = getattr(self.policy, "observe_timings", None)
            if observe is not None:   # the heartbeats: what the workers' batches cost
                observe([Timing(t, v, b, x[0], x[1], x[2], x[3], busy=x[4] / x[0])
                         for (t, v, b), x in self.timings.items()])
            self.timings = {}
        d = self.policy.decide(self._observation(now))
        if d is not None:
            self.latest = d.plan
            if self.cfg.plan_delay_s > 0:
                self.push(now + self.cfg.plan_delay_s, PLAN, d)
            else:
                self.apply(d, now)
        self.sample(now)

    def received_by(self, ts: float) -> int:
        """Requests the front door had received by ``ts`` (its routing times)."""
        return int(np.searchsorted(self.route_t, ts, side="right"))

    def sample(self, now: float) -> None:
        tk = self.ticks
        tk["t"].append(now)
        tk["demand_est"].append(self.root_est.estimate)
        tk["active"].append(sum(1 for w in self.workers.values() if w.active))
        tk["planned_accuracy"].append(self.planned_accuracy)
        n = len(tk["t"])
        counts: dict[str, int] = {}
        for w in self.workers.values():
            if w.active:
                name = f"{w.var.task}:{w.var.name}"
                counts[name] = counts.get(name, 0) + 1
        for name in counts:
            if name not in self.mix:
                self.mix[name] = [0] * (n - 1)
        for name, col in self.mix.items():
            col.append(counts.get(name, 0))

    # -- the loop ----------------------------------------------------------------
    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        # a request reaches the first stage's routing ``ingress_s`` after it was sent
        self.route_t = self.arr + self.cfg.ingress_s
        arr = self.route_t.tolist()
        n = len(arr)
        period = self.cfg.control_period_s
        if self.cfg.cold_start:
            # a cluster that has just started: its front door reported nothing for a while
            first = 0.0
            self.root_offset = 0.0
            self.root_est.observe("frontdoor", 0.0, -self.root_est.window_s)
            self.root_est.observe("frontdoor", 0.0, 0.0)
        else:
            # start in steady state at the first period's rate (as if it had run before)
            first = sum(1 for t in arr if t < period) / period
            self.root_offset = first      # the estimators see cumulative counts from t = -1 s
            self.root_est.observe("frontdoor", 0.0, -1.0)
            self.root_est.observe("frontdoor", first, 0.0)
        self.root_est.update(0.0)
        self._seed_task_rates(first)
        d = self.policy.decide(self._observation(0.0))
        if d is None:
            raise RuntimeError(f"policy {self.policy.name} produced no initial plan")
        self.apply(d, 0.0, initial=True)
        self.sample(0.0)
        end = arr[-1] if n else 0.0
        if period < end:
            self.push(period, TICK, None)
        heap = self.heap
        pend = self.pend
        bucket = self.bucket
        i = 0
        while True:
            na = arr[i] if i < n else math.inf
            if heap and heap[0][0] <= na:
                t, _, _, kind, payload = heapq.heappop(heap)
                if kind == BATCH:
                    self.on_batch(t, payload)
                elif kind == HOP:
                    w, item, deadline, c = payload
                    w.queue.push(item, deadline, w.reserve, c)
                    if not w.busy:
                        self.start(w, t)
                elif kind == PLAN:
                    self.apply(payload, t)
                elif kind == SWAP:
                    w, gen = payload
                    if gen == w.gen:
                        if w.pending is not None:
                            self.switch(w)
                        if not w.busy:
                            self.start(w, t)
                else:
                    self.tick(t, i)
                    if t + period < end:
                        self.push(t + period, TICK, None)
                continue
            if i >= n:
                break
            self.inflight += 1
            if bucket.rate is not None and not bucket.admit(na):
                self.fail[i] = SHED
                self.finish(i, na)
            else:
                pend[i] = 1
                self.route(0, "", i, 1, na)   # finishes the request itself if dropped at once
            i += 1
        if self.inflight:
            raise RuntimeError(f"{self.inflight} requests never finished")
        series = {k: np.asarray(v, dtype=float) for k, v in self.ticks.items()}
        return SimResult(policy=self.policy.name, pipeline=self.profile.name, n_workers=self.cfg.n_workers,
                         arrival_s=self.arr, status=self.status, accuracy=self.acc, latency_s=self.lat,
                         series=series, variant_mix={k: np.asarray(v) for k, v in sorted(self.mix.items())},
                         queries=self.queries, queries_dropped=self.dropped_q, batches=self.batches,
                         plans=self.plans, wall_s=time.perf_counter() - t_wall)

    def _seed_task_rates(self, root_qps: float) -> None:
        """Per-task rates before the run: the root rate times the most accurate
        variants' fan-outs (steady state at full accuracy)."""
        rate = [0.0] * len(self.tasks)
        rate[0] = root_qps
        for ti, t in enumerate(self.profile.tasks):
            if t.children:
                top = max(t.variants, key=lambda v: v.accuracy)
                for c in t.children:
                    rate[self.tasks.index(c)] = rate[ti] * t.fan_out[top.name][c]
        self.task_offset = rate
        for ti, e in enumerate(self.task_est):
            e.observe("router", 0.0, -1.0)
            e.observe("router", rate[ti], 0.0)
            e.update(0.0)
