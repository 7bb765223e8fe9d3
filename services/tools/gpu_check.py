"""``make gpu-check``: is this host's GPU path ready? One command, one summary.

On a host with an NVIDIA GPU (``scripts/gpu_check.sh`` first installs the extra for the
driver's CUDA line, ``[gpu]`` or ``[gpu-cuda12]``, into its own venv, ``.venv-gpu`` or
``.venv-gpu-cuda12``, and runs this module there):

1. the GPU and its driver (``nvidia-smi``);
2. ONNX Runtime: the package (``onnxruntime-gpu``, never beside ``onnxruntime``), and the
   CUDA execution provider for every model of the spec: each session must get
   ``CUDAExecutionProvider`` first and run a batch (a page for detectors, the same page as
   a crop for recognisers);
3. a GPU profile with the profiler (``pipeserve-profile --device auto``);
4. the demo on that profile (its workers take the CUDA provider first), and which providers
   the workers' sessions got (from their logs);
5. the bare ONNX Runtime pipeline (``services/tools/bare_ort.py``: the demo's variants and
   batch sizes, det then rec over the same pages, the CPU work included, in one process)
   on the same GPU, against the demo's pages/s;
6. the verdict (:func:`verdict`, pure): it FAILS when the demo missed its SLO (>= 1 %
   violations), when any worker's session runs on the CPU provider, or when the GPU
   profile is bimodal (p95 > 1.5x p50 at a batch size, or a batch size more than 2x
   slower than a larger one); one summary, also written as JSON.

Exit status: 0 when every step passed; 2 when there is no NVIDIA GPU (nothing else is
tried); 3 when ONNX Runtime cannot use it (the CUDA provider is missing, or a model's
session or a demo worker fell back to the CPU); 4 when the profile or the demo failed to
run; 5 when they ran but the verdict failed (SLO missed, bimodal profile).

Which ONNX Runtime build the GPU venv gets follows the driver's CUDA version
(:func:`cuda_extra`, ``nvidia-smi``'s ``CUDA Version``): 13 and later the ``gpu`` extra
(onnxruntime-gpu >= 1.27), 12 the ``gpu-cuda12`` extra (1.20-1.26); ``CUDA=12|13``
overrides it (``--print-extra`` prints the choice for ``scripts/gpu_check.sh``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CUDA = "CUDAExecutionProvider"
NO_GPU, NO_CUDA, RUN_FAILED, VERDICT_FAILED = 2, 3, 4, 5
SLO_LIMIT = 0.01          # the demo fails at >= 1 % SLO violations
SPREAD_LIMIT = 1.5        # a profile point fails at p95 > 1.5x p50 (bimodal: stalls among warm batches)
MONOTONE_LIMIT = 2.0      # a batch size more than 2x slower than a larger one is not warm


def cuda_extra(smi_header: str, override: str | None = None) -> str:
    """The pyproject extra for this driver: ``gpu`` (onnxruntime-gpu >= 1.27, CUDA 13) when
    ``nvidia-smi``'s header says ``CUDA Version: 13.x`` or later, ``gpu-cuda12`` (1.20-1.26)
    for 12.x; ``override`` ("12" or "13", from ``CUDA=``) wins. ValueError for a driver
    too old for either line, or a header without the version."""
    if override:
        major = override.strip().split(".")[0]
        if major not in ("12", "13"):
            raise ValueError(f"CUDA={override!r}: give 12 or 13")
    else:
        m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_header)
        if m is None:
            raise ValueError("nvidia-smi does not say its CUDA Version; set CUDA=12 or CUDA=13")
        major = m.group(1)
        if int(major) < 12:
            raise ValueError(f"the driver supports CUDA {m.group(1)}.{m.group(2)}: onnxruntime-gpu "
                             f">= 1.20 needs CUDA 12 (driver >= 525) or 13 (driver >= 580); update the driver")
    return "gpu-cuda12" if major == "12" else "gpu"


def profile_problems(profile: dict, spread_limit: float = SPREAD_LIMIT,
                     monotone_limit: float = MONOTONE_LIMIT) -> list[str]:
    """What makes a measured profile (its JSON) bimodal: a batch size whose p95 passes
    ``spread_limit`` x its p50, or whose p50 passes ``monotone_limit`` x a larger batch
    size's (e.g. batch 4 at 2,890 ms and batch 8 at 13 ms)."""
    out = []
    for task in profile.get("tasks", []):
        for v in task.get("variants", []):
            pts = sorted((int(b), float(p["p50_ms"]), float(p["p95_ms"])) for b, p in v["latency_ms"].items())
            for b, p50, p95 in pts:
                if p50 > 0 and p95 > spread_limit * p50:
                    out.append(f"{v['name']} batch {b}: p95 {p95:.1f} ms > {spread_limit:g}x p50 {p50:.1f} ms")
            for i, (b, p50, _) in enumerate(pts):
                for b2, q50, _ in pts[i + 1:]:
                    if q50 > 0 and p50 > monotone_limit * q50:
                        out.append(f"{v['name']}: batch {b} ({p50:.1f} ms) > {monotone_limit:g}x "
                                   f"batch {b2} ({q50:.1f} ms)")
                        break
    return out


def verdict(demo: dict | None, providers: dict[str, list[str]] | None, profile: dict | None,
            slo_limit: float = SLO_LIMIT) -> list[tuple[int, str]]:
    """Why the check fails, as ``(exit status, reason)`` pairs; empty: it passes.
    ``demo`` is the demo's report (``slo_violation_ratio``), ``providers`` what its
    workers' sessions got per variant (their logs), ``profile`` the GPU profile's JSON;
    None for a step that did not run (then it is not judged)."""
    out: list[tuple[int, str]] = []
    if providers is not None:
        on_cpu = {v: p for v, p in providers.items() if not p or p[0] != CUDA}
        if not providers:
            out.append((NO_CUDA, "no demo worker logged the providers of its session (variant_loaded)"))
        elif on_cpu:
            out.append((NO_CUDA, f"worker sessions not on {CUDA}: {on_cpu}"))
    if demo is not None:
        ratio = float(demo.get("slo_violation_ratio") if demo.get("slo_violation_ratio") is not None else 1.0)
        if ratio >= slo_limit:
            out.append((VERDICT_FAILED, f"the demo missed its SLO: {ratio:.2%} violations (must stay under "
                                        f"{slo_limit:.0%}; {demo.get('ok')}/{demo.get('sent')} OK)"))
    if profile is not None:
        problems = profile_problems(profile)
        if problems:
            out.append((VERDICT_FAILED, f"the GPU profile is bimodal ({len(problems)} points): "
                                        + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")))
    return out


class CheckFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def find_gpu(nvidia_smi: str | None = None) -> list[str]:
    """``name, driver, memory`` of every NVIDIA GPU; CheckFailed(NO_GPU) without one."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if exe is None:
        raise CheckFailed(NO_GPU, "no NVIDIA GPU on this host: nvidia-smi (the NVIDIA driver's tool) "
                                  "is not installed. Run `make gpu-check` on a host with an NVIDIA GPU "
                                  "and its driver.")
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckFailed(NO_GPU, f"nvidia-smi did not answer: {exc}") from None
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not gpus:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise CheckFailed(NO_GPU, "nvidia-smi finds no usable GPU"
                          + (f": {detail[0]}" if detail else "") + " (is the driver loaded?)")
    return gpus


def onnxruntime_package() -> tuple[str, list[str]]:
    """``(version, installed ONNX Runtime distributions)``; CheckFailed(NO_CUDA) when the
    CUDA provider is not there."""
    from importlib import metadata

    dists = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            dists.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CheckFailed(NO_CUDA, f"onnxruntime does not import: {exc}") from None
    if CUDA not in ort.get_available_providers():
        hint = ("both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files: "
                "use a venv with the [gpu] extra only (scripts/gpu_check.sh makes .venv-gpu)"
                if len(dists) > 1 else
                "this is the CPU build: `make gpu-check` installs the extra for the driver's CUDA "
                "line ([gpu] for CUDA 13, [gpu-cuda12] for CUDA 12) into its own venv"
                if not any(d.startswith("onnxruntime-gpu") for d in dists) else
                "the CUDA/cuDNN libraries did not load (onnxruntime-gpu 1.27+ need CUDA 13, 1.20-1.26 "
                "CUDA 12.x, both cuDNN 9.x; see docs/gpu.md)")
        raise CheckFailed(NO_CUDA, f"ONNX Runtime {ort.__version__} ({', '.join(dists) or '?'}) has no "
                                   f"{CUDA}; available: {ort.get_available_providers()}; {hint}")
    return ort.__version__, dists


@dataclass
class ModelCheck:
    variant: str
    model: str
    providers: list[str]
    ok: bool
    run_ms: float | None
    error: str = ""


def check_models(spec_path: Path, models: Path, page_png: bytes) -> list[ModelCheck]:
    """Every variant's model in a session with the CUDA provider first: it must get it and
    run one batch of one item."""
    from services.common.onnx import create_session
    from services.common.processing import make_processor
    from services.common.spec import load_spec

    spec = load_spec(spec_path)
    out = []
    for task in spec.tasks:
        for v in task.variants:
            try:
                proc = make_processor(v, models, spec.plugins)
                session, providers = create_session(proc.model_path, prefer_gpu=True)
                if not providers or providers[0] != CUDA:
                    out.append(ModelCheck(v.name, v.model, providers, False, None,
                                          f"the session got {providers}, not {CUDA} first"))
                    continue
                proc.run_batch(session, [proc.prepare(page_png)])          # warm-up (kernels, arena)
                t = time.perf_counter()
                proc.run_batch(session, [proc.prepare(page_png)])
                out.append(ModelCheck(v.name, v.model, providers, True, (time.perf_counter() - t) * 1e3))
            except Exception as exc:   # reported per model, the others still checked
                out.append(ModelCheck(v.name, v.model, [], False, None, f"{type(exc).__name__}: {exc}"[:300]))
    return out


def worker_providers(log_dir: Path) -> dict[str, list[str]]:
    """``variant -> providers`` of the sessions the demo's workers loaded (their
    ``variant_loaded`` log lines, key=value or JSON)."""
    out: dict[str, list[str]] = {}
    for log in sorted(log_dir.glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "variant_loaded" not in line:
                continue
            if line.lstrip().startswith("{"):
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                out[str(d.get("variant"))] = [str(x) for x in d.get("providers", [])]
                continue
            variant = re.search(r"\bvariant=(\S+)", line)
            provs = re.search(r"\bproviders=\[([^\]]*)\]", line)
            if variant and provs:
                out[variant.group(1)] = re.findall(r"\w+ExecutionProvider", provs.group(1))
    return out


def _run(cmd: list[str], what: str, log: Path) -> None:
    print(f"--- {what}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    print(log.read_text()[-2500:], flush=True)
    if rc != 0:
        raise CheckFailed(RUN_FAILED, f"{what} failed with exit status {rc} (log: {log})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--pages", type=Path, default=Path("data/eval"))
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="profile, demo report, logs, summary")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of demo load (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="profiler: timed batches per batch size (default 5)")
    p.add_argument("--skip-demo", action="store_true", help="stop after the profile")
    p.add_argument("--bare-pages", type=int, default=20, help="pages of the bare ONNX Runtime pipeline (default 20)")
    p.add_argument("--print-extra", action="store_true",
                   help="print the pyproject extra for this driver's CUDA version (CUDA=12|13 overrides) and exit")
    a = p.parse_args(argv)
    if a.print_extra:
        return print_extra()
    summary: dict = {"ok": False, "steps": {}}
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        gpus = find_gpu()
        summary["steps"]["gpu"] = gpus
        print("GPU: " + "; ".join(gpus), flush=True)
        version, dists = onnxruntime_package()
        summary["steps"]["onnxruntime"] = {"version": version, "packages": dists}
        print(f"ONNX Runtime {version} ({', '.join(dists)}): {CUDA} available", flush=True)
        page = sorted(a.pages.glob("p*.png"))
        if not page:
            raise CheckFailed(RUN_FAILED, f"no pages in {a.pages}: run `make data` first")
        checks = check_models(a.spec, a.models, page[0].read_bytes())
        summary["steps"]["models"] = [asdict(c) for c in checks]
        for c in checks:
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.variant:<22} {c.model:<30} "
                  + (f"{c.run_ms:7.1f} ms  {c.providers}" if c.ok else c.error), flush=True)
        bad = [c.variant for c in checks if not c.ok]
        if bad:
            raise CheckFailed(NO_CUDA, f"{len(bad)} of {len(checks)} models do not run on {CUDA}: {bad}")
        profile = a.out / "ocr_gpu.json"
        _run([sys.executable, "-m", "services.tools.profiler", "--spec", str(a.spec), "--models", str(a.models),
              "--eval", str(a.pages), "--device", "auto", "--repeats", str(a.repeats), "--out", str(profile)],
             "profile", a.out / "profile.log")
        prof = json.loads(profile.read_text())
        summary["steps"]["profile"] = {"path": str(profile), "device": prof.get("device"),
                                       "problems": profile_problems(prof)}
        if CUDA not in str(prof.get("device")):
            raise CheckFailed(NO_CUDA, f"the profile was measured on {prof.get('device')!r}, not the GPU")
        demo = used = None
        if a.skip_demo:
            summary["skipped"] = ["demo", "bare"]
        else:
            report = a.out / "demo.json"
            _run([sys.executable, "-m", "services.tools.demo", "--spec", str(a.spec), "--profile", str(profile),
                  "--calibrate", "off", "--models", str(a.models), "--pages", str(a.pages),
                  "--duration", f"{a.duration:g}", "--json", str(report), "--log-dir", str(a.out / "demo-logs"),
                  "--quiet"], "demo", a.out / "demo.log")
            demo = json.loads(report.read_text())
            used = worker_providers(a.out / "demo-logs")
            summary["steps"]["demo"] = {k: demo.get(k) for k in ("sent", "ok", "slo_violation_ratio", "latency_p50_ms",
                                                                  "latency_p99_ms", "throughput_rps", "goodput_rps",
                                                                  "mean_cer")}
            summary["steps"]["demo"]["worker_providers"] = used
            summary["steps"]["bare"] = bare_step(a.spec, a.models, a.pages, demo, a.bare_pages)
        reasons = verdict(demo, used, prof)
        summary["reasons"] = [r for _, r in reasons]
        if reasons:
            raise CheckFailed(min(code for code, _ in reasons), "; ".join(r for _, r in reasons))
        summary["ok"] = True
    except CheckFailed as exc:
        summary["error"] = str(exc)
        summary["exit_status"] = exc.code
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(format_summary(summary), flush=True)
    return 0 if summary["ok"] else summary["exit_status"]


def bare_step(spec_path: Path, models: Path, pages_dir: Path, demo: dict, max_pages: int) -> dict:
    """The bare ONNX Runtime pipeline with the demo's variants on the GPU, and the demo's
    on-time pages/s against it (an error is reported, not raised: it judges nothing)."""
    from services.common.spec import load_spec
    from services.ocr.pages import load_pages
    from services.tools.bare_ort import run_pipeline, variants_from_report

    try:
        spec = load_spec(spec_path)
        chosen = variants_from_report(demo, {v.name: t.name for t in spec.tasks for v in t.variants})
        pages = [p.png for p in load_pages(pages_dir)[:max_pages]]
        r = run_pipeline(spec, models, pages, chosen, provider="cuda", passes=2)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    cluster = float(demo.get("goodput_rps") or 0.0)
    return {"variants": {t: f"{v}:{b}" for t, (v, b) in chosen.items()}, "pages_per_s": r.pages_per_s,
            "task_ms_per_pass": {t: x * 1e3 for t, x in r.task_seconds.items()},
            "items_per_pass": r.items, "cluster_pages_per_s": cluster,
            "cluster_over_bare": cluster / r.pages_per_s if r.pages_per_s > 0 else None}


def print_extra() -> int:
    """``--print-extra``: the extra for this driver (scripts/gpu_check.sh installs it)."""
    import os

    override = os.environ.get("CUDA") or None
    header = ""
    if not override:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            print("gpu-check: FAILED: no nvidia-smi to read the CUDA version from; set CUDA=12 or CUDA=13",
                  file=sys.stderr)
            return NO_GPU
        header = subprocess.run([exe], capture_output=True, text=True, timeout=60).stdout
    try:
        print(cuda_extra(header, override))
    except ValueError as exc:
        print(f"gpu-check: FAILED: {exc}", file=sys.stderr)
        return NO_CUDA
    return 0


def format_summary(s: dict) -> str:
    st = s["steps"]
    head = "PASSED" if s["ok"] else "FAILED"
    if s["ok"] and s.get("skipped"):
        # a check that did not run the demo has not judged the SLO: it must not read as a pass of it
        head = f"PASSED up to the profile only ({' and '.join(s['skipped'])} skipped: the SLO is not judged)"
    lines = [f"== gpu-check: {head} =="]
    if "gpu" in st:
        lines.append("GPU            " + "; ".join(st["gpu"]))
    if "onnxruntime" in st:
        lines.append(f"ONNX Runtime   {st['onnxruntime']['version']} ({', '.join(st['onnxruntime']['packages'])})")
    if "models" in st:
        ok = sum(m["ok"] for m in st["models"])
        lines.append(f"models on CUDA {ok}/{len(st['models'])}")
    if "profile" in st:
        lines.append(f"profile        {st['profile']['path']} ({st['profile']['device']})")
    if "demo" in st:
        d = st["demo"]
        lines.append(f"demo           {d['ok']}/{d['sent']} OK, SLO violations {d['slo_violation_ratio'] or 0:.4f}, "
                     f"p50 {d['latency_p50_ms'] or 0:.1f} ms, p99 {d['latency_p99_ms'] or 0:.1f} ms, "
                     f"{d['throughput_rps'] or 0:.1f} req/s, CER {d['mean_cer'] or 0:.4f}")
        lines.append(f"workers        {d['worker_providers']}")
    if "bare" in st:
        b = st["bare"]
        lines.append("bare ORT       " + (f"error: {b['error']}" if "error" in b else
                     f"{b['pages_per_s']:.2f} pages/s ({', '.join(b['variants'].values())}); cluster "
                     f"{b['cluster_pages_per_s']:.2f} pages/s on time = {b['cluster_over_bare'] or 0:.0%} of it")
                     + " [reported, not judged]")
    if not s["ok"]:
        for r in s.get("reasons") or [s["error"]]:
            lines.append(f"FAILED         {r}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
