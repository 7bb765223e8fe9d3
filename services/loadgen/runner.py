"""The open-loop load generator core: send a schedule to an OIP v2 front door.

:func:`run_load` sends every scheduled request at its time without waiting for earlier
replies (open loop), each with a gRPC deadline, and returns a :class:`LoadReport`.

Guarantees:

* every scheduled request ends in exactly one :class:`RequestResult` (a gRPC status, or
  a client-side code: refused by the in-flight cap, unparsable answer, client error, or
  still pending at the hard stop);
* the run stops by itself: at most ``schedule span + timeout + grace`` after the start,
  any call still pending is cancelled and counted as ``CLIENT_NOT_FINISHED``.

Latency (and so the SLO check) is measured from each request's *scheduled* send time:
when the generator itself falls behind its schedule, the lag counts against the request
(open-loop accounting), and the report says how late sends went out (``send_lag_*``,
per request ``send_lag_s``). The gRPC deadline still runs from the actual send.
CER against ground truth is computed after the run, off the sending path. With a Redis
URL or a controller address the plan in force is sampled every second
(:mod:`services.loadgen.plan_history`) into ``LoadReport.plan_history``.
"""
from __future__ import annotations

import asyncio
import gc
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc

from services.common import oip
from services.common.grpc_utils import TlsConfig, make_channel, tls_mode
from services.common.redis_auth import redact_url
from services.gen import inference_pb2
from services.loadgen import report as rep
from services.loadgen.plan_history import PlanSampler
from services.loadgen.schedule import (Arrival, RateShape, poisson_schedule, read_trace,
                                       shape_schedule, trace_schedule)

# Pending calls get this long past their own deadline before the hard stop cancels them.
STOP_GRACE_S = 5.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _string_field(number: int, value: str) -> bytes:
    """One length-delimited protobuf field (wire type 2), to append to a serialised message."""
    data = value.encode()
    out = bytearray([(number << 3) | 2])
    n = len(data)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


@dataclass(frozen=True)
class LoadConfig:
    """One load run. Exactly one of ``rate`` (Poisson, with ``duration_s``), ``shape``
    (Poisson with a time-varying rate, with ``duration_s``) and ``trace`` (replay) selects
    the arrivals; ``timeout_ms`` defaults to ``slo_ms``. ``redis_url`` and/or
    ``controller`` turn on the plan history (a sample every ``plan_interval_s``).
    ``procs > 1`` sends from that many processes (``max_in_flight`` split between them)."""

    target: str
    pipeline: str = "ocr"
    pages_dir: Path | None = None
    rate: float | None = None
    duration_s: float | None = None
    trace: Path | None = None
    time_scale: float = 1.0
    rate_scale: float = 1.0
    use_trace_deadlines: bool = False
    seed: int = 0
    slo_ms: float = 1500.0
    timeout_ms: float | None = None
    send_timeout_param: bool = False
    max_in_flight: int = 10_000
    progress: bool = True
    tls: TlsConfig | None = None   # None: plaintext; a client cert in it for mutual TLS
    shape: RateShape | None = None
    redis_url: str | None = None    # plan history from the plan key in Redis
    controller: str | None = None   # plan history from the controller (ClusterStatus)
    plan_interval_s: float = 1.0
    # sender processes (services/loadgen/senders.py): the schedule is dealt round-robin
    # to this many processes, each with its own channel and event loop; 1 sends from here
    procs: int = 1

    @property
    def effective_timeout_ms(self) -> float:
        return self.timeout_ms if self.timeout_ms is not None else self.slo_ms

    def validate(self) -> None:
        given = [x is not None for x in (self.rate, self.shape, self.trace)]
        if sum(given) != 1:
            raise ValueError("give exactly one of a rate (Poisson), a rate shape or a trace to replay")
        if (self.rate is not None or self.shape is not None) and self.duration_s is None:
            raise ValueError("a Poisson run (constant rate or shape) needs a duration")
        if self.shape is not None:
            self.shape.validate()
        if self.plan_interval_s <= 0:
            raise ValueError(f"plan_interval_s must be > 0, got {self.plan_interval_s}")
        if self.slo_ms <= 0 or self.effective_timeout_ms <= 0:
            raise ValueError("slo_ms and timeout_ms must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.procs < 1:
            raise ValueError(f"procs must be at least 1, got {self.procs}")
        if self.max_in_flight < self.procs:
            raise ValueError(f"max_in_flight ({self.max_in_flight}) is split between the "
                             f"{self.procs} sender processes: it must be at least procs")


@dataclass(frozen=True)
class LoadPage:
    """One image to send and, when known, its ground-truth lines (whatever ``cer_fn``
    takes as truth)."""

    name: str
    image: bytes
    truth: object | None = None


CerFn = Callable[[list[tuple[str, tuple[float, ...]]], object], float]


def build_schedule(config: LoadConfig) -> list[Arrival]:
    config.validate()
    if config.rate is not None:
        return poisson_schedule(config.rate, float(config.duration_s), config.seed)
    if config.shape is not None:
        return shape_schedule(config.shape, float(config.duration_s), config.seed)
    entries = read_trace(config.trace)
    return trace_schedule(entries, time_scale=config.time_scale, rate_scale=config.rate_scale,
                          seed=config.seed, duration_s=config.duration_s)


def arrival_window_s(config: LoadConfig, schedule: Sequence[Arrival]) -> float:
    """Seconds over which requests were offered: the run's duration when it bounds the
    schedule, else the last arrival's time."""
    last = schedule[-1].t_s if schedule else 0.0
    if config.duration_s is not None and config.duration_s >= last:
        return float(config.duration_s)
    return last


def request_budget_ms(config: LoadConfig, arrival: Arrival) -> tuple[float, float]:
    """``(slo_ms, timeout_ms)`` of one request: the trace's own deadline for both when
    ``use_trace_deadlines`` and the trace has one, else the run's SLO and timeout."""
    if config.use_trace_deadlines and arrival.deadline_ms:
        return arrival.deadline_ms, arrival.deadline_ms
    return config.slo_ms, config.effective_timeout_ms


def load_page_set(directory: str | Path) -> list[LoadPage]:
    """Pages written by ``pipeserve-make-pages`` (p000.png ... + ground_truth.json)."""
    from services.ocr.pages import load_pages

    pages = load_pages(directory)
    if not pages:
        raise ValueError(f"{directory}: no pages")
    return [LoadPage(f"p{i:03d}", p.png, p.lines) for i, p in enumerate(pages)]


def default_cer_fn() -> CerFn | None:
    try:
        from services.ocr.cer import page_cer
    except ImportError:  # the OCR extras are optional for a bare load generator
        return None
    return page_cer


@dataclass
class _Pending:
    index: int
    page: int
    slo_s: float
    lines: list[oip.OcrLine] | None = None


async def run_load(config: LoadConfig, pages: Sequence[LoadPage] | None = None, *,
                   schedule: Sequence[Arrival] | None = None,
                   cer_fn: CerFn | None = None) -> rep.LoadReport:
    """Run one load test; see the module docstring for the guarantees.

    ``pages`` defaults to ``config.pages_dir``; ``schedule`` to :func:`build_schedule`;
    ``cer_fn`` to ``services.ocr.cer.page_cer`` (CER is skipped when it is missing or a
    page has no truth)."""
    config.validate()
    if schedule is None:
        schedule = build_schedule(config)
    if pages is None:
        if config.pages_dir is None:
            raise ValueError("no pages: give pages_dir (a pipeserve-make-pages directory)")
        pages = load_page_set(config.pages_dir)
    if not pages:
        raise ValueError("no pages to send")
    if cer_fn is None:
        cer_fn = default_cer_fn()

    loop = asyncio.get_running_loop()
    bar = _progress(config, len(schedule))
    sampler = (PlanSampler(config.pipeline, redis_url=config.redis_url, controller=config.controller,
                           tls=config.tls, interval_s=config.plan_interval_s)
               if config.redis_url or config.controller else None)
    try:
        if config.procs > 1:
            from services.loadgen.senders import run_senders   # it imports this module

            sent = await run_senders(config, pages, schedule, sampler=sampler, bar=bar)
            results, pendings, max_lag, elapsed = sent.results, sent.pendings, sent.max_lag, sent.elapsed_s
        else:
            sender = _Sender(config, pages, on_finish=bar.update if bar is not None else None)
            try:
                with quiet_gc():
                    start = loop.time()
                    wall_start = time.perf_counter()
                    if sampler is not None:
                        await sampler.start(start)
                    try:
                        await sender.run(enumerate(schedule), start)
                    finally:
                        elapsed = time.perf_counter() - wall_start
                        if sampler is not None:
                            await sampler.stop()
            finally:
                await sender.close()
            results, pendings, max_lag = sender.results, sender.pendings, sender.max_lag
    finally:
        if bar is not None:
            bar.close()

    for index in range(len(schedule)):  # belt and braces: nothing silently lost
        if index not in results:
            results[index] = rep.RequestResult(index, rep.NOT_FINISHED, None, config.slo_ms / 1000)
    final = _with_cer(results, pendings, pages, cer_fn)
    return rep.summarize(final, elapsed_s=elapsed, window_s=arrival_window_s(config, schedule),
                         max_send_lag_s=max_lag,
                         config=_config_dict(config, len(schedule)),
                         plan_history=sampler.samples if sampler is not None else ())


@contextmanager
def quiet_gc():
    """A full garbage collection stalls the sending loop for 10-20 ms, more as the kept
    results grow (docs/performance.md): what exists on entry (pages, the schedule, the
    channel) is frozen out of the collections, young collections run less often, and no
    full (generation 2) one runs until exit. Cycles that outlive two young collections wait
    for the end of the run; the young collections still free the short-lived ones."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], 50_000), thresholds[1], max(thresholds[2], 1_000_000))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class _Sender:
    """Sends ``(index, arrival)`` pairs at ``start + arrival.t_s`` (event-loop clock, i.e.
    ``time.monotonic()``) on one channel, open loop. After :meth:`run` every arrival it was
    given has exactly one result in ``results`` (OK answers' parsed lines in ``pendings``),
    also when ``run`` is cancelled; ``max_lag`` is the worst send lag in seconds.

    Requests go out pre-serialised: each page's request is built once, and a request's own
    id is appended as one more field (protobuf merges it), so sending a request copies no
    image and builds no message (the sending loop is the generator's limit). Answers are
    kept as bytes while the run goes on and read (:meth:`_read_answers`) once every call
    has ended: parsing them cost ~10 % of the sending loop's CPU at 2,000 req/s."""

    def __init__(self, config: LoadConfig, pages: Sequence[LoadPage], *,
                 on_finish: Callable[[int], object] | None = None) -> None:
        self.config = config
        self.pages = pages
        self.results: dict[int, rep.RequestResult] = {}
        self.pendings: dict[int, _Pending] = {}
        self.max_lag = 0.0
        self.channel = make_channel(config.target, tls=config.tls)
        self._infer = self.channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        self._answers: dict[int, tuple[int, float, bytes]] = {}   # OK answers, read after the run
        self._templates: dict[tuple[int, int | None], bytes] = {}
        self._on_finish = on_finish
        self._in_flight = 0
        self._start = 0.0

    def _wire_request(self, page_no: int, request_id: str, timeout_ms: int | None) -> bytes:
        key = (page_no, timeout_ms)
        t = self._templates.get(key)
        if t is None:
            t = self._templates[key] = oip.build_image_request(
                self.config.pipeline, self.pages[page_no].image, timeout_ms=timeout_ms).SerializeToString()
        return t + _string_field(3, request_id)   # field 3: ModelInferRequest.id

    def _finish(self, result: rep.RequestResult) -> None:
        assert result.index not in self.results, f"request {result.index} counted twice"
        self.results[result.index] = result
        if self._on_finish is not None:
            self._on_finish(1)

    async def _one(self, index: int, arrival: Arrival, page_no: int, slo_s: float,
                   timeout_s: float) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        request = self._wire_request(page_no, f"lg-{config.seed}-{index}",
                                     int(round(timeout_s * 1000)) if config.send_timeout_param else None)
        scheduled = self._start + arrival.t_s    # latency counts from here (loop clock)
        lag = loop.time() - scheduled
        code, latency, message = rep.CLIENT_ERROR, None, ""
        try:
            answer = await self._infer(request, timeout=timeout_s)
            latency = loop.time() - scheduled
            self._answers[index] = (page_no, slo_s, answer)
            code = rep.OK           # until _read_answers finds it unreadable
        except grpc.aio.AioRpcError as exc:
            latency = loop.time() - scheduled
            code = exc.code().name
            message = exc.details() or ""
        except asyncio.CancelledError:
            code = rep.NOT_FINISHED
        except Exception as exc:
            code = rep.CLIENT_ERROR
            message = f"the load generator's client failed: {type(exc).__name__}: {exc}"[:300]
        finally:
            self._in_flight -= 1
            self._finish(rep.RequestResult(index, code, latency, slo_s, t_s=arrival.t_s, message=message,
                                           send_lag_s=max(0.0, lag)))

    def _read_answers(self) -> None:
        """Parse the OK answers kept during the run: their lines go to ``pendings``, their
        plan version and variant path to their result; an answer that does not parse turns
        its result into BAD_RESPONSE."""
        answers, self._answers = self._answers, {}
        for index, (page_no, slo_s, answer) in answers.items():
            r = self.results[index]
            try:
                response = inference_pb2.ModelInferResponse.FromString(answer)
                lines = oip.parse_ocr_response(response)
                params = oip.read_parameters(response.parameters)
            except Exception as exc:  # an OK status with an unreadable answer
                self.results[index] = replace(r, code=rep.BAD_RESPONSE, message=(
                    f"status OK but the answer did not parse: {type(exc).__name__}: {exc}")[:300])
                continue
            self.pendings[index] = _Pending(index, page_no, slo_s, lines)
            version, path = params.get("plan_version"), params.get("variant_path")
            self.results[index] = replace(r, plan_version=int(version) if isinstance(version, int) else None,
                                          variant_path=str(path) if path is not None else None)

    async def run(self, arrivals: Iterable[tuple[int, Arrival]], start: float) -> None:
        """Send every arrival at its time, then wait for the answers; calls still pending
        ``timeout + STOP_GRACE_S`` after the last send are cancelled (CLIENT_NOT_FINISHED)."""
        config, pages, loop = self.config, self.pages, asyncio.get_running_loop()
        self._start = start
        tasks: set[asyncio.Task] = set()
        longest = 0.0
        try:
            for index, arrival in arrivals:
                delay = start + arrival.t_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.max_lag = max(self.max_lag, loop.time() - (start + arrival.t_s))
                slo_ms, timeout_ms = request_budget_ms(config, arrival)
                longest = max(longest, timeout_ms)
                if self._in_flight >= config.max_in_flight:
                    self._finish(rep.RequestResult(index, rep.IN_FLIGHT_CAP, None, slo_ms / 1000.0,
                                                   t_s=arrival.t_s))
                    continue
                self._in_flight += 1
                task = asyncio.create_task(self._one(index, arrival, index % len(pages), slo_ms / 1000.0,
                                                     timeout_ms / 1000.0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                _, still = await asyncio.wait(set(tasks), timeout=longest / 1000.0 + STOP_GRACE_S)
                for task in still:
                    task.cancel()
                if still:
                    await asyncio.gather(*still, return_exceptions=True)
        finally:
            for task in list(tasks):  # interrupted (e.g. Ctrl-C): every task still counts
                task.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            self._read_answers()      # every call has ended: off the sending path

    async def close(self) -> None:
        await self.channel.close()


def _with_cer(results: dict[int, rep.RequestResult], pendings: dict[int, _Pending],
              pages: Sequence[LoadPage], cer_fn: CerFn | None) -> list[rep.RequestResult]:
    out = []
    cache: dict[tuple, float] = {}
    for index in sorted(results):
        r = results[index]
        p = pendings.get(index)
        if r.ok and p is not None and cer_fn is not None and pages[p.page].truth is not None:
            pred = [(ln.text, ln.points) for ln in p.lines or []]
            key = (p.page, tuple(pred))
            if key not in cache:
                cache[key] = float(cer_fn(pred, pages[p.page].truth))
            r = replace(r, cer=cache[key])
        if (r.ok and p is not None and p.lines and p.lines[0].orientation is not None
                and pages[p.page].truth is not None):
            r = replace(r, orientation_acc=_orientation_acc(p.lines, pages[p.page].truth))
        out.append(r)
    return out


def _orientation_acc(lines: Sequence[oip.OcrLine], truth) -> float | None:
    """Share of the truth lines whose orientation the answer reads right (None without
    the OCR extras)."""
    try:
        from services.ocr.orientation import orientation_accuracy
    except ImportError:
        return None
    return orientation_accuracy([(ln.orientation or "", ln.points) for ln in lines], truth)


def _config_dict(config: LoadConfig, scheduled: int) -> dict:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    d["tls"] = tls_mode(config.tls)   # "off", "tls" or "mtls"; not the key's path
    d["redis_url"] = redact_url(config.redis_url)   # no password in reports
    if config.shape is not None:
        d["shape_description"] = config.shape.describe()
    d["scheduled"] = scheduled
    d["effective_timeout_ms"] = config.effective_timeout_ms
    return d


def _progress(config: LoadConfig, total: int):
    if not config.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{config.pipeline} @ {config.target}", unit="req",
                file=sys.stderr, dynamic_ncols=True)
