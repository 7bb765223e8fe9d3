"""Figures of load runs (PNG, matplotlib Agg): one run, or several compared on one figure.

    python -m services.loadgen.figures RECORDS [PLAN_HISTORY] --out DIR [--window-s 1]
    python -m services.loadgen.figures --run A=a.jsonl,a_plans.json --run B=b.jsonl --out DIR

From Python: ``write_figures([Run("greedy", report.records, report.plan_history), ...],
out_dir)``. Figures (files in ``out_dir``):

* ``load.png``: offered load (requests scheduled per second) and goodput (on-time answers
  per second), binned by scheduled send time;
* ``latency_cdf.png``: CDF of the latency of OK answers (from the scheduled send time), with
  the SLO;
* ``violations_accuracy.png``: SLO violation ratio and mean CER of the answers per window;
* ``variant_mix.png``: share of OK answers per variant path per window (one panel per run);
* ``workers.png``: workers the plan runs per task/variant over time (stacked), with the
  parked ones on top and plan changes marked (one panel per run; needs a plan history).

Windows are ``window_s`` seconds of scheduled send time; requests are binned by
``scheduled_s``.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from services.loadgen.records import read_plan_history, read_records

FIGURES = ("load.png", "latency_cdf.png", "violations_accuracy.png", "variant_mix.png", "workers.png")


@dataclass
class Run:
    """One run to draw: its records (dicts as in ``LoadReport.records``) and plan history."""

    label: str
    records: Sequence[dict]
    plan_history: Sequence[dict] = field(default_factory=list)


@dataclass
class Windows:
    """Per-window series of one run (index i covers ``[t[i], t[i] + window_s)``)."""

    t: np.ndarray
    sent: np.ndarray
    ok: np.ndarray
    on_time: np.ndarray
    violation_ratio: np.ndarray    # NaN where nothing was sent
    mean_cer: np.ndarray           # NaN where no answer had a CER
    variants: dict[str, np.ndarray]   # variant path -> OK answers per window


def windows(records: Sequence[dict], window_s: float = 1.0) -> Windows:
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    times = [r.get("scheduled_s") for r in records]
    if any(t is None for t in times):
        raise ValueError("every record needs a scheduled_s")
    end = max(times, default=0.0)
    n = max(1, int(math.floor(end / window_s)) + 1)
    idx = np.minimum((np.asarray(times, dtype=float) / window_s).astype(int), n - 1)
    sent = np.bincount(idx, minlength=n).astype(float)
    ok_mask = np.array([bool(r.get("ok")) for r in records], dtype=bool)
    on_mask = np.array([bool(r.get("on_time")) for r in records], dtype=bool)
    ok = np.bincount(idx[ok_mask], minlength=n).astype(float) if len(records) else np.zeros(n)
    on = np.bincount(idx[on_mask], minlength=n).astype(float) if len(records) else np.zeros(n)
    cer_sum, cer_n = np.zeros(n), np.zeros(n)
    variants: dict[str, np.ndarray] = {}
    for i, r in zip(idx, records):
        if r.get("ok") and r.get("cer") is not None:
            cer_sum[i] += float(r["cer"])
            cer_n[i] += 1
        if r.get("ok"):
            path = r.get("variant_path") or "(unknown)"
            variants.setdefault(path, np.zeros(n))[i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        violation = np.where(sent > 0, (sent - on) / sent, np.nan)
        cer = np.where(cer_n > 0, cer_sum / cer_n, np.nan)
    return Windows(np.arange(n) * window_s, sent, ok, on, violation, cer, variants)


def _ext(w: Windows, y: np.ndarray, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A per-window series as a post-step line that also covers the last window."""
    return np.append(w.t, w.t[-1] + window_s), np.append(y, y[-1])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def plot_load(runs: Sequence[Run], path: Path, window_s: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, color in zip(runs, _colors(len(runs))):
        w = windows(run.records, window_s)
        ax.step(*_ext(w, w.sent / window_s, window_s), where="post", color=color, linestyle="--", alpha=0.8,
                label=f"{run.label}: offered")
        ax.step(*_ext(w, w.on_time / window_s, window_s), where="post", color=color, linewidth=2,
                label=f"{run.label}: goodput (on time)")
    ax.set_xlabel("scheduled send time (s)")
    ax.set_ylabel("requests / s")
    ax.set_title(f"Offered load vs goodput ({window_s:g} s windows)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdf(runs: Sequence[Run], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    slos = set()
    for run, color in zip(runs, _colors(len(runs))):
        lat = np.sort([r["latency_ms"] for r in run.records if r.get("ok") and r.get("latency_ms") is not None])
        slos.update(r["slo_ms"] for r in run.records if r.get("slo_ms") is not None)
        if lat.size:
            # the CDF over *all* requests: requests never answered OK keep it below 1
            ax.step(lat, np.arange(1, lat.size + 1) / max(1, len(run.records)), where="post",
                    color=color, label=f"{run.label} ({lat.size}/{len(run.records)} answered OK)")
    for slo in sorted(slos)[:3]:
        ax.axvline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} ms")
    ax.set_xlabel("latency from scheduled send (ms)")
    ax.set_ylabel("fraction of all requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("Latency CDF (OK answers; failures keep the curve below 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_violations_accuracy(runs: Sequence[Run], path: Path, window_s: float) -> None:
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for run, color in zip(runs, _colors(len(runs))):
        w = windows(run.records, window_s)
        top.step(*_ext(w, w.violation_ratio, window_s), where="post", color=color, label=run.label)
        if np.isfinite(w.mean_cer).any():
            bottom.step(*_ext(w, w.mean_cer, window_s), where="post", color=color, label=run.label)
    top.set_ylabel("SLO violation ratio")
    top.set_ylim(-0.02, 1.02)
    top.set_title(f"SLO violations and accuracy per {window_s:g} s window")
    bottom.set_ylabel("mean CER of answers\n(lower = more accurate)")
    bottom.set_xlabel("scheduled send time (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variant_mix(runs: Sequence[Run], path: Path, window_s: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs) + 0.6), sharex=True,
                             squeeze=False)
    all_paths = sorted({p for run in runs for p in windows(run.records, window_s).variants})
    colors = dict(zip(all_paths, _colors(len(all_paths))))
    for ax, run in zip(axes[:, 0], runs):
        w = windows(run.records, window_s)
        paths = sorted(w.variants)
        if paths:
            with np.errstate(invalid="ignore", divide="ignore"):
                shares = [np.where(w.ok > 0, w.variants[p] / w.ok, 0.0) for p in paths]
            t_ext = np.append(w.t, w.t[-1] + window_s)
            ax.stackplot(t_ext, [np.append(x, x[-1]) for x in shares], labels=paths, colors=[colors[p] for p in paths], step="post")
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no OK answers", transform=ax.transAxes, ha="center")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of OK answers")
        ax.set_title(f"{run.label}: variant paths served", fontsize=10)
    axes[-1, 0].set_xlabel("scheduled send time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_workers(runs: Sequence[Run], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs) + 0.6), sharex=True,
                             squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        samples = [s for s in run.plan_history if "error" not in s]
        if not samples:
            ax.text(0.5, 0.5, "no plan history", transform=ax.transAxes, ha="center")
            ax.set_title(f"{run.label}: workers", fontsize=10)
            continue
        t = np.array([s["t_s"] for s in samples], dtype=float)
        keys = sorted({k for s in samples for k in s.get("workers", {})})
        layers = [[s.get("workers", {}).get(k, 0) for s in samples] for k in keys]
        labels, colors = list(keys), _colors(len(keys))
        if any(s.get("parked") is not None for s in samples):
            layers.append([s.get("parked") or 0 for s in samples])
            labels.append("parked (registered, not in the plan)")
            colors.append("lightgrey")
        # stacked: the top of the coloured layers is the plan's active workers
        ax.stackplot(t, layers, labels=labels, colors=colors, step="post")
        versions = [s.get("version") for s in samples]
        for i in range(1, len(samples)):
            if versions[i] != versions[i - 1]:
                ax.axvline(t[i], color="red", alpha=0.6, linewidth=1)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("workers")
        ax.set_title(f"{run.label}: workers per task/variant, stacked (red lines: new plan)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time since the run's start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(runs: Sequence[Run], out_dir: str | Path, window_s: float = 1.0) -> list[Path]:
    """Draw every figure (see the module docstring) into ``out_dir``; returns the paths."""
    if not runs:
        raise ValueError("no runs to draw")
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in FIGURES]
    plot_load(runs, paths[0], window_s)
    plot_latency_cdf(runs, paths[1])
    plot_violations_accuracy(runs, paths[2], window_s)
    plot_variant_mix(runs, paths[3], window_s)
    plot_workers(runs, paths[4])
    return paths


def _run_arg(text: str) -> Run:
    label, sep, files = text.partition("=")
    if not sep or not label or not files:
        raise argparse.ArgumentTypeError(f"expected LABEL=RECORDS[,PLAN_HISTORY], got {text!r}")
    parts = files.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected LABEL=RECORDS[,PLAN_HISTORY], got {text!r}")
    return Run(label, read_records(parts[0]), read_plan_history(parts[1]) if len(parts) == 2 else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.loadgen.figures",
        description="PNG figures of load-generator runs: offered load vs goodput, latency CDF, "
                    "SLO violations and accuracy over time, variant mix, workers over time. "
                    "Give one run (RECORDS [PLAN_HISTORY]) or several (--run, repeated).")
    p.add_argument("records", nargs="?", type=Path, help="--records file of a run (JSONL or CSV)")
    p.add_argument("plan_history", nargs="?", type=Path,
                   help="--plan-history file (or the run's --json report)")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=RECORDS[,PLAN_HISTORY]",
                   help="a run to compare (repeat for several runs on one figure)")
    p.add_argument("--label", default="run", help="label of the single run (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the PNGs")
    p.add_argument("--window-s", type=float, default=1.0, metavar="S",
                   help="window of the per-time series (default: %(default)s)")
    args = p.parse_args(argv)
    if args.run and args.records:
        p.error("give RECORDS or --run, not both")
    if not args.run and not args.records:
        p.error("give RECORDS [PLAN_HISTORY] or at least one --run")
    if args.window_s <= 0:
        p.error("--window-s must be > 0")
    try:
        runs = [_run_arg(r) for r in args.run] if args.run else [
            Run(args.label, read_records(args.records),
                read_plan_history(args.plan_history) if args.plan_history else [])]
        paths = write_figures(runs, args.out, args.window_s)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    except (OSError, ValueError) as exc:
        print(f"figures: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
