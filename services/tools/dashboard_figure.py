"""Draw the Grafana dashboard's main panels from metrics scraped during a real run.

    python -m services.tools.dashboard_figure                  # OCR cluster, docs/metrics.png
    python -m services.tools.dashboard_figure --pipeline echo  # the no-op echo pipeline

Starts a local cluster (``services.tools.cluster``) with every service's ``/metrics``
endpoint on, sends Poisson load in phases (``--phases RATE:SECONDS,...``, e.g. a step up
past what the workers carry at full accuracy and back), and has the endpoints scraped
every second: by a Prometheus server when one is installed (Debian's ``prometheus``
package; ``--scraper prometheus``), else by this script itself (``--scraper own``). Then it
evaluates the queries of the dashboard's main panels (deploy/grafana/dashboards/pipeserve.json,
``$__rate_interval`` = 5 s) over the run, with Prometheus's ``query_range`` or with
``services.tools.promql``, and draws them with matplotlib. The OCR run plans with the
planner on the profile calibrated for this host (as ``make demo``), starting from the
first phase's rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from services.common.redis_server import free_port
from services.loadgen.runner import LoadConfig, LoadPage, load_page_set, run_load
from services.tools.cluster import ClusterConfig, LocalCluster
from services.tools.promql import SeriesStore, query_range

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pipeserve.json"
MAIN_PANELS = (
    "Requests by outcome", "End-to-end latency", "Demand and capacity",
    "Stage latency p95", "Worker queue length", "Mean batch size",
    "Workers per variant (plan)", "Drops, sheds and reroutes", "Batch time p95",
)
SCRAPE_S = 1.0
RATE_INTERVAL = "5s"   # Grafana's $__rate_interval at a 1 s scrape: 4 x the scrape interval

# The echo pipeline's made-up profile (a few ms per batch), for the planner.
ECHO_PROFILE = {
    "format": "pipeserve-profile/1", "name": "echo", "slo_ms": 1000.0, "device": "made up",
    "provenance": "made up by services/tools/dashboard_figure.py for the echo pipeline",
    "tasks": [
        {"name": "a", "children": ["b"], "fan_out": {"echo_a": {"b": 1.0}},
         "variants": [{"name": "echo_a", "accuracy": 1.0, "latency_ms": {
             "1": {"p50_ms": 2.0, "p95_ms": 4.0}, "8": {"p50_ms": 8.0, "p95_ms": 16.0}}}]},
        {"name": "b", "variants": [{"name": "echo_b", "accuracy": 1.0, "latency_ms": {
            "1": {"p50_ms": 2.0, "p95_ms": 4.0}, "8": {"p50_ms": 8.0, "p95_ms": 16.0}}}]},
    ],
}


def resolve(expr: str, rate_interval: str = RATE_INTERVAL) -> str:
    """A dashboard query with Grafana's variables replaced."""
    return expr.replace("$__rate_interval", rate_interval)


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by the series' label value."""
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    while "{{" in out:
        a = out.index("{{")
        b = out.index("}}", a)
        out = out[:a] + out[b + 2:]
    return out.strip() or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def job_of(process: str) -> str:
    return process.split("-", 1)[0]


# -- scraping ----------------------------------------------------------------------------
class OwnScraper:
    """Scrapes every endpoint each ``interval_s`` into a :class:`SeriesStore`, with the
    ``job`` and ``instance`` labels Prometheus would add."""

    name = "own scrape"

    def __init__(self, targets: dict[str, str], interval_s: float = SCRAPE_S) -> None:
        self.targets = targets
        self.interval_s = interval_s
        self.store = SeriesStore()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self.failures = 0

    def start(self) -> "OwnScraper":
        self._thread.start()
        return self

    def _run(self) -> None:
        next_t = time.time()
        while not self._stop.is_set():
            for process, address in self.targets.items():
                t = time.time()
                try:
                    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    self.failures += 1
                    continue
                self.store.add_exposition(t, text, {"job": job_of(process), "instance": address})
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.time()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def query_range(self, expr: str, start: float, end: float, step: float):
        return [(dict(labels), ts, vs) for labels, (ts, vs) in
                query_range(expr, self.store, start, end, step).items()]


class PrometheusScraper:
    """A Prometheus server (the ``prometheus`` binary) scraping the endpoints every
    second into a throwaway TSDB; queries go to its HTTP API."""

    def __init__(self, binary: str, targets: dict[str, str], workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        jobs: dict[str, list[str]] = {}
        for process, address in targets.items():
            jobs.setdefault(job_of(process), []).append(address)
        config = {"global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": f"{SCRAPE_S:g}s"},
                  "scrape_configs": [{"job_name": j, "static_configs": [{"targets": a}]} for j, a in jobs.items()]}
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=1))   # JSON is YAML
        version = subprocess.run([binary, "--version"], capture_output=True, text=True)
        self.name = "Prometheus " + ((version.stdout or version.stderr).split()[2:3] or ["?"])[0]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PrometheusScraper":
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}); log: {self.workdir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query_range(self, expr: str, start: float, end: float, step: float):
        q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                    "step": f"{step:g}"})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/query_range?{q}", timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        out = []
        for s in body["data"]["result"]:
            pts = [(float(t), float(v)) for t, v in s["values"] if math.isfinite(float(v))]
            if pts:
                out.append(({k: v for k, v in s["metric"].items() if k != "__name__"},
                            [t for t, _ in pts], [v for _, v in pts]))
        return out


# -- the run -----------------------------------------------------------------------------
def parse_phases(text: str) -> list[tuple[float, float]]:
    phases = []
    for item in text.split(","):
        rate, sep, secs = item.partition(":")
        try:
            r, s = float(rate), float(secs)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--phases expects RATE:SECONDS,..., got {item!r}") from None
        if not sep or r <= 0 or s <= 0:
            raise argparse.ArgumentTypeError(f"--phases: rate and seconds must be positive, got {item!r}")
        phases.append((r, s))
    return phases


def echo_pages(n: int = 16) -> list[LoadPage]:
    import io

    import numpy as np
    from PIL import Image

    pages = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (24 + i, 24 + i, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        pages.append(LoadPage(f"echo{i}", buf.getvalue()))
    return pages


def run(args: argparse.Namespace) -> int:
    phases = args.phases
    log_dir = Path(args.log_dir or f"runs/metrics-figure-{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    headroom = 2.0
    if args.pipeline == "ocr":
        from services.tools.calibrate import profile_for_host

        spec = ROOT / "pipelines" / "ocr.yaml"
        profile, _ = profile_for_host(spec, ROOT / "profiles" / "ocr_cpu.json", Path(args.models),
                                      Path(args.pages), cache_dir=Path("runs/profiles"))
        pages = load_page_set(args.pages)
        slo_ms = 1500.0
    else:
        spec = ROOT / "pipelines" / "echo.yaml"
        profile = log_dir / "echo_profile.json"
        profile.write_text(json.dumps(ECHO_PROFILE))
        pages = echo_pages()
        slo_ms = 1000.0
    binary = shutil.which("prometheus") if args.scraper != "own" else None
    if args.scraper == "prometheus" and binary is None:
        print("error: --scraper prometheus: no prometheus binary on PATH (apt-get install prometheus)",
              file=sys.stderr)
        return 2
    cluster = LocalCluster(ClusterConfig(spec=spec, profile=profile, models=Path(args.models),
                                         log_dir=log_dir, metrics=True, headroom=headroom,
                                         min_demand_qps=phases[0][0] * headroom))
    scraper = None
    print(f"starting the {args.pipeline} cluster with metrics (logs: {log_dir}) ...", flush=True)
    try:
        cluster.start()
        if binary is not None:
            scraper = PrometheusScraper(binary, cluster.metrics_addresses, log_dir).start()
        else:
            scraper = OwnScraper(cluster.metrics_addresses).start()
        print(f"scraping {len(cluster.metrics_addresses)} endpoints every {SCRAPE_S:g} s with {scraper.name}",
              flush=True)
        time.sleep(3 * SCRAPE_S)   # a few scrapes before the load
        t_start = time.time()
        bounds, summary = [], []
        for i, (rate, secs) in enumerate(phases):
            t0 = time.time() - t_start
            print(f"phase {i + 1}/{len(phases)}: {rate:g} req/s for {secs:g} s", flush=True)
            config = LoadConfig(target=cluster.front_door, pipeline=cluster.spec.name, rate=rate,
                                duration_s=secs, seed=i, slo_ms=slo_ms, progress=False)
            report = asyncio.run(run_load(config, pages))
            bounds.append((t0, time.time() - t_start, rate))
            summary.append({"rate": rate, "seconds": secs, "sent": report.sent, "ok": report.ok,
                            "dropped": report.dropped, "shed": report.shed,
                            "slo_violation_ratio": round(report.slo_violation_ratio, 4),
                            "p50_ms": report.latency_p50_ms, "p95_ms": report.latency_p95_ms,
                            "variant_paths": report.variant_paths})
            print(f"  sent {report.sent}, ok {report.ok}, dropped {report.dropped}, shed {report.shed}, "
                  f"SLO violations {report.slo_violation_ratio:.4f}, p50/p95 "
                  f"{report.latency_p50_ms or 0:.0f}/{report.latency_p95_ms or 0:.0f} ms, "
                  f"paths {report.variant_paths}", flush=True)
        time.sleep(6 * SCRAPE_S)   # the last windows fill
        t_end = time.time()
        cluster.check_alive()
        panels = collect_panels(scraper, t_start - 2, t_end)
    finally:
        if scraper is not None:
            scraper.stop()
        cluster.stop()
    data = {"pipeline": args.pipeline, "phases": summary, "scraper": scraper.name if scraper else "",
            "bounds": [list(b) for b in bounds],
            "panels": {t: {"unit": unit, "stacked": stacked,
                           "series": [{"legend": lg, "t": [round(x - t_start, 3) for x in ts], "v": vs}
                                      for lg, ts, vs in series]}
                       for t, (unit, stacked, series) in panels.items()}}
    (log_dir / "figure-data.json").write_text(json.dumps(data, indent=1))
    redraw(data, args.out)
    print(f"wrote {args.out} (data: {log_dir / 'figure-data.json'}; redraw with --from-data)")
    return 0


def redraw(data: dict, out: str) -> None:
    """The figure from a run's ``figure-data.json`` (times relative to the load's start)."""
    panels = {t: (p["unit"], p["stacked"], [(x["legend"], x["t"], x["v"]) for x in p["series"]])
              for t, p in data["panels"].items()}
    draw(panels, [tuple(b) for b in data["bounds"]], SimpleNamespace(pipeline=data["pipeline"], out=out),
         data["scraper"], 0.0)


def collect_panels(scraper, start: float, end: float) -> dict[str, tuple[str, list]]:
    dash = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: p for p in dash["panels"]}
    out = {}
    for title in MAIN_PANELS:
        p = by_title[title]
        series = []
        for t in p["targets"]:
            for labels, ts, vs in scraper.query_range(resolve(t["expr"]), start, end, SCRAPE_S):
                series.append((legend(t.get("legendFormat", ""), labels), ts, vs))
        defaults = p["fieldConfig"]["defaults"]
        stacked = defaults.get("custom", {}).get("stacking", {}).get("mode", "none") != "none"
        out[title] = (defaults.get("unit", ""), stacked, sorted(series, key=lambda s: s[0]))
    return out


def with_gaps(ts: list[float], vs: list[float], step: float) -> tuple[list[float], list[float]]:
    """The series with a NaN wherever samples are missing, so a line does not bridge a gap."""
    xs, ys = [], []
    for i, (t, v) in enumerate(zip(ts, vs)):
        if i and t - ts[i - 1] > 1.5 * step:
            xs.append((t + ts[i - 1]) / 2)
            ys.append(math.nan)
        xs.append(t)
        ys.append(v)
    return xs, ys


def draw(panels: dict, bounds: list, args: argparse.Namespace, scraper_name: str, t_start: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.3 * rows), sharex=True)
    scale = {"s": (1000.0, "ms"), "reqps": (1.0, "req/s"), "percentunit": (100.0, "%")}
    for ax, (title, (unit, stacked, series)) in zip(axes.flat, panels.items()):
        k, label = scale.get(unit, (1.0, ""))
        # an all-zero series among many (outcomes that never happened) is left out
        had = bool(series)
        series = [x for x in series if any(abs(v) > 0 for v in x[2]) or len(series) <= 4]
        shown = len(series)
        if stacked and series:
            # as Grafana stacks them: on one time grid, a missing sample counting 0
            grid = sorted({t for _, ts, _ in series for t in ts})
            ys = [[dict(zip(ts, vs)).get(t, 0.0) * k for t in grid] for _, ts, vs in series]
            ax.stackplot([t - t_start for t in grid], *ys, labels=[x[0] for x in series], alpha=0.75)
        else:
            for name, ts, vs in series:
                xs, ys = with_gaps(ts, vs, SCRAPE_S)
                ax.plot([t - t_start for t in xs], [v * k for v in ys], lw=1.2, label=name)
        if not shown:
            ax.text(0.5, 0.5, "all zero" if had else "no data", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.set_title(title, fontsize=10)
        if label:
            ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        for a, b, _ in bounds[1:]:
            ax.axvline(a, color="grey", lw=0.6, ls="--")
        if shown:
            ax.legend(fontsize=7, loc="upper left", ncol=1 if shown <= 4 else 2)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the load started", fontsize=8)
    rates = " → ".join(f"{r:g}" for _, _, r in bounds)
    fig.suptitle(f"pipeserve dashboard, main panels: {args.pipeline} cluster, Poisson load {rates} req/s "
                 f"(dashed: rate changes); scraped every {SCRAPE_S:g} s by {scraper_name}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.tools.dashboard_figure", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=["ocr", "echo"], default="ocr")
    p.add_argument("--phases", type=parse_phases, default=None,
                   help="load phases RATE:SECONDS,... (default: ocr 3:20,10:30,3:25; echo 20:15,80:20,20:15)")
    p.add_argument("--scraper", choices=["auto", "prometheus", "own"], default="auto",
                   help="who scrapes: a Prometheus server (auto: when `prometheus` is on PATH) or this script")
    p.add_argument("--out", default="docs/metrics.png", help="the figure (PNG)")
    p.add_argument("--models", default="models")
    p.add_argument("--pages", default="data/eval", help="OCR pages (make data)")
    p.add_argument("--from-data", default=None, metavar="FIGURE_DATA_JSON",
                   help="only redraw the figure from an earlier run's figure-data.json")
    p.add_argument("--log-dir", default=None, help="service logs, Prometheus data, the figure's data "
                                                   "(default runs/metrics-figure-<time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_data:
        redraw(json.loads(Path(args.from_data).read_text()), args.out)
        print(f"wrote {args.out}")
        return 0
    if args.phases is None:
        args.phases = parse_phases("3:20,10:30,3:25" if args.pipeline == "ocr" else "20:15,80:20,20:15")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
