"""Prometheus metrics of every service: the names, and the HTTP endpoint that serves them.

A service given ``--metrics-port`` serves ``/metrics`` (the Prometheus text format) on
its ``--host`` interface, over HTTPS with the service's own certificate when it runs TLS
(and requiring a client certificate under mutual TLS). Without the flag nothing listens.
Every name starts with ``pipeserve_``; the list, with what each means, is in
docs/metrics.md, and deploy/grafana/dashboards/pipeserve.json draws them.

Two kinds of values, so that serving a request costs next to nothing:

- read when scraped: counters and gauges the services keep anyway (a worker's outcome
  counts, queue length, state; the front door's counts) are read from the live objects by
  a collector at scrape time, so the data path does no extra work for them;
- observed when they happen: histograms (batch sizes and times, stage and end-to-end
  latency, model load and solve times) and a few counters, through labelled children
  bound once per service and variant, never created per request.

The metric objects live at module level (one process-wide registry, as Prometheus
clients do), so several cores in one process (the unit tests) share them without a
duplicate registration; scrape-time collectors hold their services weakly and report a
worker id once (the newest core of that id).
"""
from __future__ import annotations

import argparse
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.logging import get_logger

log = get_logger(__name__)

# No *_created series (one per counter and histogram child): they double the series and
# the dashboard's rate() needs none. A fixed choice of this process's exposition.
disable_created_metrics()

PREFIX = "pipeserve_"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
SOLVE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

# -- observed when they happen -----------------------------------------------------------
WORKER_BATCH_SIZE = Histogram(
    "pipeserve_worker_batch_size", "Queries per batch a worker ran", ["worker", "variant"],
    buckets=BATCH_SIZE_BUCKETS)
WORKER_BATCH_SECONDS = Histogram(
    "pipeserve_worker_batch_seconds", "Wall time of one batch on the model (in the executor, "
    "pre-processing not included)", ["worker", "variant"], buckets=LATENCY_BUCKETS)
WORKER_MODEL_LOAD_SECONDS = Histogram(
    "pipeserve_worker_model_load_seconds", "Time to load a model variant, with its warm-up",
    ["worker", "variant"], buckets=LOAD_BUCKETS)
ROUTER_STAGE_SECONDS = Histogram(
    "pipeserve_router_stage_seconds", "Per request: from the router's arrival to its own "
    "stage's results (worker round trips, queueing and batching included; child stages not)",
    ["task"], buckets=LATENCY_BUCKETS)
ROUTER_ROUTE_SECONDS = Histogram(
    "pipeserve_router_route_seconds", "Per request: the router's whole Route, child stages included",
    ["task"], buckets=LATENCY_BUCKETS)
FRONTDOOR_LATENCY_SECONDS = Histogram(
    "pipeserve_frontdoor_latency_seconds", "End-to-end latency of answered (OK) requests, "
    "arrival at the front door to answer", ["pipeline"], buckets=LATENCY_BUCKETS)
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005) + LATENCY_BUCKETS   # a phase may take microseconds
FRONTDOOR_PHASE_SECONDS = Histogram(
    "pipeserve_frontdoor_phase_seconds", "Per answered (OK) request: its time in each phase of "
    "the latency breakdown along its critical path (input, queue, preprocess, model, postprocess, "
    "crop_encode, worker, transfer, router, output, unaccounted; docs/metrics.md)",
    ["pipeline", "phase"], buckets=PHASE_BUCKETS)
CONTROLLER_SOLVE_SECONDS = Histogram(
    "pipeserve_controller_solve_seconds", "Wall time of one planner decision (CVXPY solve "
    "included)", ["pipeline"], buckets=SOLVE_BUCKETS)
CONTROLLER_RECONCILE_SECONDS = Histogram(
    "pipeserve_controller_reconcile_seconds", "Wall time of one reconcile step",
    ["pipeline"], buckets=SOLVE_BUCKETS)
CONTROLLER_PLANS = Counter(
    "pipeserve_controller_plans_published", "Plan versions published", ["pipeline"])
CONTROLLER_LOST = Counter(
    "pipeserve_controller_workers_lost", "Workers dropped for missed heartbeats", ["pipeline"])
CONTROLLER_HEARTBEATS = Counter(
    "pipeserve_controller_heartbeats", "Worker heartbeats received", ["pipeline"])


# -- read when scraped -------------------------------------------------------------------
class _Live(Collector):
    """Families read at scrape time from live service objects (held weakly).

    ``families()`` returns empty families (name, help, labels); ``fill(obj, families)``
    adds one object's samples. A scrape runs on the HTTP server's thread: fillers only
    read plain attributes (ints, floats, an enum), which is safe beside the event loop.
    """

    def __init__(self, families: Callable[[], dict[str, Metric]],
                 fill: Callable[[Any, dict[str, Metric]], None],
                 key: Callable[[Any], str] = lambda obj: str(id(obj))) -> None:
        self._families = families
        self._fill = fill
        self._key = key
        self._objs: list[weakref.ref] = []
        self._lock = threading.Lock()

    def add(self, obj: Any) -> None:
        with self._lock:
            self._objs = [r for r in self._objs if r() is not None] + [weakref.ref(obj)]

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        with self._lock:
            live = [o for o in (r() for r in self._objs) if o is not None]
        newest: dict[str, Any] = {}
        for obj in live:                     # later (newer) objects win a shared key
            newest[self._key(obj)] = obj
        for obj in newest.values():
            try:
                self._fill(obj, families)
            except RuntimeError:             # a dict resized under a scrape: skip it once
                continue
        return list(families.values())


def _worker_families() -> dict[str, Metric]:
    return {
        "queries": CounterMetricFamily(
            "pipeserve_worker_queries", "Queries a worker resolved, by outcome (ok, dropped: "
            "could not make its deadline, invalid, error; shed: refused, queue full)",
            labels=["worker", "outcome"]),
        "parks": CounterMetricFamily("pipeserve_worker_parks", "Times the worker parked "
                                     "(the plan did not need it)", labels=["worker"]),
        "queue": GaugeMetricFamily("pipeserve_worker_queue_length", "Queries queued in the worker",
                                   labels=["worker"]),
        "plan": GaugeMetricFamily("pipeserve_worker_plan_version", "Plan version the worker follows",
                                  labels=["worker"]),
        "state": GaugeMetricFamily("pipeserve_worker_state", "1 for the worker's state "
                                   "(idle, loading, serving, swapping, parked), 0 for the others",
                                   labels=["worker", "state"]),
        "model": GaugeMetricFamily("pipeserve_worker_model", "1 for the model variant the worker "
                                   "serves (no sample while it holds none)",
                                   labels=["worker", "task", "variant"]),
        "batch_limit": GaugeMetricFamily("pipeserve_worker_max_batch_size",
                                         "Batch size the plan gives the worker", labels=["worker"]),
    }


_WORKER_OUTCOMES = (("ok", "completed"), ("dropped", "dropped"), ("invalid", "invalid"),
                    ("error", "errors"), ("shed", "shed"))


def _fill_worker(core: Any, f: dict[str, Metric]) -> None:
    wid = str(core.worker_id)
    counts = dict(core.counters)
    for outcome, key in _WORKER_OUTCOMES:
        f["queries"].add_metric([wid, outcome], counts.get(key, 0))
    f["parks"].add_metric([wid], counts.get("parks", 0))
    f["queue"].add_metric([wid], core.waiting)
    f["plan"].add_metric([wid], core.plan_version)
    state = core.state
    for s in type(state):                    # every state of the enum, the current one 1
        f["state"].add_metric([wid, s.value], 1.0 if s is state else 0.0)
    host = core.host
    if host is not None:
        task = getattr(core, "task", None)
        f["model"].add_metric([wid, getattr(task, "name", ""), host.variant.name], 1.0)
    f["batch_limit"].add_metric([wid], core.batch_size)


def _router_families() -> dict[str, Metric]:
    return {
        "queries": CounterMetricFamily(
            "pipeserve_router_queries", "Queries of this stage answered by the router, by their "
            "status at this stage (ok, dropped_deadline, shed, invalid, internal, unavailable)",
            labels=["task", "outcome"]),
        "reroutes": CounterMetricFamily(
            "pipeserve_router_reroutes", "Worker groups sent elsewhere than the routing policy "
            "chose: slack (the chosen worker would leave too little slack) or unavailable (retried "
            "on another worker)", labels=["task", "reason"]),
        "plan": GaugeMetricFamily("pipeserve_router_plan_version", "Plan version the router follows",
                                  labels=["task"]),
    }


def _fill_router(m: "RouterMetrics", f: dict[str, Metric]) -> None:
    core = m.core()
    if core is None:
        return
    task = m.task
    for status, n in list(m.outcomes.items()):
        f["queries"].add_metric([task, m.status_names.get(status, str(status))], n)
    f["reroutes"].add_metric([task, "slack"], m.reroutes_slack)
    f["reroutes"].add_metric([task, "unavailable"], m.reroutes_unavailable)
    plan = core.plan
    f["plan"].add_metric([task], plan.version if plan is not None else 0)


def _frontdoor_families() -> dict[str, Metric]:
    return {
        "requests": CounterMetricFamily(
            "pipeserve_frontdoor_requests", "Requests answered by the front door, by outcome (ok, "
            "dropped: DEADLINE_EXCEEDED, shed: RESOURCE_EXHAUSTED, invalid, not_found, failed: "
            "UNAVAILABLE or INTERNAL, cancelled by the client)", labels=["pipeline", "outcome"]),
        "received": CounterMetricFamily(
            "pipeserve_frontdoor_received", "Valid requests received (the demand the controller "
            "estimates: admitted or shed by admission control)", labels=["pipeline"]),
        "accepted": CounterMetricFamily("pipeserve_frontdoor_accepted", "Requests admitted and routed",
                                        labels=["pipeline"]),
        "inflight": GaugeMetricFamily("pipeserve_frontdoor_inflight_bytes",
                                      "Bytes of requests read and not answered yet", labels=["pipeline"]),
        "receiving": GaugeMetricFamily("pipeserve_frontdoor_receiving", "Request bodies being read "
                                       "now, and arrivals waiting for a slot to read theirs",
                                       labels=["pipeline", "state"]),
        "admission": GaugeMetricFamily("pipeserve_frontdoor_admission_rate_qps", "Admission rate "
                                       "the plan sets (no sample: unlimited)", labels=["pipeline"]),
    }


FRONTDOOR_OUTCOMES = ("ok", "dropped", "shed", "invalid", "not_found", "failed", "cancelled")


def _fill_frontdoor(servicer: Any, f: dict[str, Metric]) -> None:
    name = servicer.spec.name
    counts = dict(servicer.counts)
    for outcome in FRONTDOOR_OUTCOMES:
        f["requests"].add_metric([name, outcome], counts.get(outcome, 0))
    f["received"].add_metric([name], counts.get("received", 0))
    f["accepted"].add_metric([name], counts.get("accepted", 0))
    f["inflight"].add_metric([name], servicer.inflight_bytes)
    f["receiving"].add_metric([name, "reading"], servicer.receiving)
    f["receiving"].add_metric([name, "waiting"], servicer.waiting_to_receive)
    rate = getattr(servicer.admission, "rate", None)
    if rate is not None:
        f["admission"].add_metric([name], rate)


_WORKERS = _Live(_worker_families, _fill_worker, key=lambda core: str(core.worker_id))
_ROUTERS = _Live(_router_families, _fill_router, key=lambda m: m.task)
_FRONTDOORS = _Live(_frontdoor_families, _fill_frontdoor, key=lambda s: s.spec.name)


class _Snapshot(Collector):
    """Families computed by the controller's loop (its own thread) and swapped in whole,
    so a scrape never reads the registry or the planner while they change."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def describe(self) -> Iterable[Metric]:
        return _controller_families(pipeline="")

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


_CONTROLLER = _Snapshot()


# -- per service -------------------------------------------------------------------------
class WorkerMetrics:
    """A worker core's metrics. Its counters, queue, plan version, state and model are
    read from the core when scraped (a new ``WorkerState`` member such as ``parked``
    shows up by itself); batches and model loads are reported with the methods below."""

    def __init__(self, core: Any) -> None:
        self._core = weakref.ref(core)
        self._batch: dict[str, tuple[Any, Any]] = {}   # variant -> (size, seconds) children
        self._bound_to = ""
        _WORKERS.add(core)

    def _children(self, variant: str) -> tuple[Any, Any]:
        core = self._core()
        wid = str(core.worker_id) if core is not None else ""
        if wid != self._bound_to:            # the worker id is known only once it bound its port
            self._batch, self._bound_to = {}, wid
        pair = self._batch.get(variant)
        if pair is None:
            pair = self._batch[variant] = (WORKER_BATCH_SIZE.labels(wid, variant),
                                           WORKER_BATCH_SECONDS.labels(wid, variant))
        return pair

    def batch(self, variant: str, size: int, seconds: float) -> None:
        """One batch of ``size`` queries ran on ``variant`` in ``seconds``."""
        size_h, seconds_h = self._children(variant)
        size_h.observe(size)
        seconds_h.observe(seconds)

    def model_loaded(self, variant: str, seconds: float) -> None:
        """``variant`` was loaded (with its warm-up) in ``seconds``; its batch series
        start at zero now, so a rate over them is defined before the first batch."""
        core = self._core()
        WORKER_MODEL_LOAD_SECONDS.labels(str(core.worker_id) if core is not None else "",
                                         variant).observe(seconds)
        self._children(variant)


class RouterMetrics:
    """A stage router's metrics: query outcomes and reroutes are plain counts here
    (exported when scraped), the stage and route latencies histograms bound once."""

    def __init__(self, core: Any, task: str, status_names: Mapping[int, str]) -> None:
        self.core = weakref.ref(core)
        self.task = task
        self.status_names = dict(status_names)
        self.outcomes: dict[int, int] = {s: 0 for s in self.status_names}
        self.reroutes_slack = 0
        self.reroutes_unavailable = 0
        self._stage = ROUTER_STAGE_SECONDS.labels(task)
        self._route = ROUTER_ROUTE_SECONDS.labels(task)
        _ROUTERS.add(self)

    def stage_done(self, results: Iterable[Any], seconds: float) -> None:
        """This stage's own results for one request (child stages not yet run)."""
        self._stage.observe(seconds)
        outcomes = self.outcomes
        for r in results:
            outcomes[r.status] = outcomes.get(r.status, 0) + 1

    def route_done(self, seconds: float) -> None:
        self._route.observe(seconds)


class FrontDoorMetrics:
    """The front door's metrics: its ``counts`` are read when scraped; the end-to-end
    latency of each answered request is observed."""

    def __init__(self, servicer: Any) -> None:
        _FRONTDOORS.add(servicer)
        self._latency = FRONTDOOR_LATENCY_SECONDS.labels(servicer.spec.name)
        self._phases: dict[str, Any] = {}
        self._pipeline = servicer.spec.name

    def answered(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def phases(self, phases_ms: Mapping[str, float], unaccounted_ms: float) -> None:
        """One answered request's latency breakdown (ms per phase, services/router/stats.py)."""
        children = self._phases
        for phase, ms in phases_ms.items():
            h = children.get(phase)
            if h is None:
                h = children[phase] = FRONTDOOR_PHASE_SECONDS.labels(self._pipeline, phase)
            h.observe(ms / 1e3)
        h = children.get("unaccounted")
        if h is None:
            h = children["unaccounted"] = FRONTDOOR_PHASE_SECONDS.labels(self._pipeline, "unaccounted")
        h.observe(unaccounted_ms / 1e3)


def _controller_families(pipeline: str) -> list[Metric]:
    g = GaugeMetricFamily
    return [
        g("pipeserve_controller_plan_version", "Version of the plan in force", labels=["pipeline"]),
        g("pipeserve_controller_demand_qps", "Estimated demand (requests/s) from the front doors' "
          "counters (planner mode)", labels=["pipeline"]),
        g("pipeserve_controller_planned_demand_qps", "Demand the current plan was solved for "
          "(the estimate times the headroom; planner mode)", labels=["pipeline"]),
        g("pipeserve_controller_plan_capacity_qps", "Requests/s the plan in force serves",
          labels=["pipeline"]),
        g("pipeserve_controller_plan_expected_accuracy", "Expected accuracy of the plan in force",
          labels=["pipeline"]),
        g("pipeserve_controller_plan_admission_rate_qps", "Admission rate of the plan in force "
          "(no sample: unlimited)", labels=["pipeline"]),
        g("pipeserve_controller_plan_workers", "Workers the plan in force runs, per task and variant",
          labels=["pipeline", "task", "variant"]),
        g("pipeserve_controller_workers", "Registered workers by the state their last heartbeat "
          "reported (registering: none yet)", labels=["pipeline", "state"]),
        g("pipeserve_controller_calibration_factor", "Measured batch time over the profile's, per "
          "variant (planner mode, once measured)", labels=["pipeline", "task", "variant"]),
        g("pipeserve_controller_host_factor", "This host's speed factor against the profile "
          "(planner mode, once measured)", labels=["pipeline"]),
    ]


class ControllerMetrics:
    """The controller's metrics. ``update(core)`` runs once per reconcile step on the
    controller's loop and computes every gauge from the core (plan, demand, registry,
    calibration); the solve time, step time, published plans, lost workers and
    heartbeats are observed as they happen."""

    WORKER_STATES = ("registering", "idle", "loading", "serving", "swapping", "parked")

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self._solve = CONTROLLER_SOLVE_SECONDS.labels(pipeline)
        self._reconcile = CONTROLLER_RECONCILE_SECONDS.labels(pipeline)
        self._plans = CONTROLLER_PLANS.labels(pipeline)
        self._lost = CONTROLLER_LOST.labels(pipeline)
        self._heartbeats = CONTROLLER_HEARTBEATS.labels(pipeline)

    def solved(self, seconds: float) -> None:
        self._solve.observe(seconds)

    def heartbeat(self) -> None:
        self._heartbeats.inc()

    def step_done(self, duration_s: float, published: bool, lost: int) -> None:
        self._reconcile.observe(duration_s)
        if published:
            self._plans.inc()
        if lost:
            self._lost.inc(lost)

    def update(self, core: Any) -> None:
        """Recompute the gauges from ``core`` (a ControllerCore) and publish them."""
        p = self.pipeline
        fams = {f.name: f for f in _controller_families(p)}
        plan = core.current
        fams["pipeserve_controller_plan_version"].add_metric([p], plan.version if plan else 0)
        fams["pipeserve_controller_demand_qps"].add_metric([p], core.demand_qps)
        planner = core.planner
        if planner is not None and planner.planned_demand is not None:
            fams["pipeserve_controller_planned_demand_qps"].add_metric([p], planner.planned_demand)
        if plan is not None:
            if plan.capacity_qps is not None:
                fams["pipeserve_controller_plan_capacity_qps"].add_metric([p], plan.capacity_qps)
            if plan.expected_accuracy is not None:
                fams["pipeserve_controller_plan_expected_accuracy"].add_metric([p], plan.expected_accuracy)
            if plan.admission_rate_qps is not None:
                fams["pipeserve_controller_plan_admission_rate_qps"].add_metric([p], plan.admission_rate_qps)
            per: dict[tuple[str, str], int] = {}
            for w in plan.workers.values():
                per[(w.task, w.variant)] = per.get((w.task, w.variant), 0) + 1
            for (task, variant), n in sorted(per.items()):
                fams["pipeserve_controller_plan_workers"].add_metric([p, task, variant], n)
        states = {s: 0 for s in self.WORKER_STATES}
        for rec in list(core.registry.records.values()):
            s = str(rec.stats.get("state") or "registering")
            states[s] = states.get(s, 0) + 1
        for s, n in states.items():
            fams["pipeserve_controller_workers"].add_metric([p, s], n)
        if planner is not None:
            cal = planner.calibrator
            for (task, variant), factor in sorted(cal.factors().items()):
                fams["pipeserve_controller_calibration_factor"].add_metric([p, task, variant], factor)
            host = cal.host_factor()
            if host is not None:
                fams["pipeserve_controller_host_factor"].add_metric([p], host)
        _CONTROLLER.families = list(fams.values())


for _c in (_WORKERS, _ROUTERS, _FRONTDOORS, _CONTROLLER):
    REGISTRY.register(_c)


# -- the endpoint ------------------------------------------------------------------------
@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    host: str
    port: int
    scheme: str
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int | None, host: str = "127.0.0.1", tls: Any = None) -> MetricsServer | None:
    """Serve ``/metrics`` on ``host:port`` (0: any free port) in a daemon thread; None
    (the flag not given) serves nothing. ``tls`` (a ``TlsConfig``) serves HTTPS with the
    service's certificate, requiring a client certificate when it requires one."""
    if port is None:
        return None
    kw: dict[str, Any] = {}
    if tls is not None and tls.cert is not None:
        kw = {"certfile": str(tls.cert), "keyfile": str(tls.key)}
        if tls.require_client_cert:
            kw.update(client_cafile=str(tls.ca), client_auth_required=True)
    try:
        server, thread = start_http_server(port, addr=host, **kw)
    except OSError as exc:   # the port is taken, or the host is not an address of this machine
        raise SystemExit(f"error: --metrics-port {port}: cannot listen on {host}:{port}: "
                         f"{exc.strerror or exc}") from None
    ms = MetricsServer(host, server.server_port, "https" if kw else "http", server, thread)
    log.info("metrics_serving", address=f"{ms.host}:{ms.port}", scheme=ms.scheme, path="/metrics")
    return ms


def metrics_port(text: str) -> int:
    """argparse type of ``--metrics-port``: a port number, 0 for any free port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=metrics_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host; "
                             "HTTPS with the service's certificate under TLS); 0 = any free port; "
                             "default: no metrics endpoint")


def metric_names() -> set[str]:
    """Every sample name the services export under ``pipeserve_`` (histograms as their
    ``_bucket``/``_sum``/``_count`` series, counters with ``_total``): what a dashboard
    query may use."""
    names: set[str] = set()
    fams: list[Metric] = []
    for c in (WORKER_BATCH_SIZE, WORKER_BATCH_SECONDS, WORKER_MODEL_LOAD_SECONDS, ROUTER_STAGE_SECONDS,
              ROUTER_ROUTE_SECONDS, FRONTDOOR_LATENCY_SECONDS, FRONTDOOR_PHASE_SECONDS, CONTROLLER_SOLVE_SECONDS,
              CONTROLLER_RECONCILE_SECONDS, CONTROLLER_PLANS, CONTROLLER_LOST, CONTROLLER_HEARTBEATS):
        fams.extend(c.describe())
    fams += list(_worker_families().values()) + list(_router_families().values())
    fams += list(_frontdoor_families().values()) + _controller_families("")
    for f in fams:
        if f.type == "histogram":
            names |= {f"{f.name}_bucket", f"{f.name}_sum", f"{f.name}_count"}
        elif f.type == "counter":
            names.add(f"{f.name}_total")
        else:
            names.add(f.name)
    return {n for n in names if n.startswith(PREFIX)}
