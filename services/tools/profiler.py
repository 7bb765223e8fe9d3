"""Measure a pipeline's variants on this host and write a profile (``pipeserve-profile``).

    pipeserve-profile --spec pipelines/ocr.yaml --pages 20 --out profiles/ocr_cpu.json

For every variant of the spec (or ``--variants``):

* **latency per batch size** (p50/p95 over ``--repeats`` timed batches, after ``--warmup``
  untimed ones per batch size). What is timed is what a worker spends on one batch:
  ``prepare`` of every item (decode, resize, normalise) plus ``run_batch`` (the
  ``session.run`` call and post-processing: DB boxes and crop encoding, or CTC decoding).
  Root-task batches are evaluation pages; child-task batches are real child payloads (OCR:
  crops) produced from those pages by the most accurate measured parent variant. Batches
  rotate through the pool, so batch composition (crop widths) varies as in service.
* **fan-out**: mean child queries per page per parent variant (OCR: boxes per page).
* **accuracy** (OCR only: ``ppocr_det`` -> ``ppocr_rec``): the mean page CER of every
  (detector, recogniser) pair on the evaluation pages; path accuracy ``A(d, r) = 1 - CER``
  (clipped to [0, 1]) is stored in ``path_accuracy`` and variant accuracies are a
  reference factorisation of it (see :func:`factorise`, docs/planner.md).
* **orientation accuracy** (OCR tree: ``ppocr_det`` -> (``ppocr_rec``, ``ppocr_cls``),
  pipelines/ocr_tree.yaml): the share of ground-truth lines of the ``--orient-eval`` pages
  (``pipeserve-make-pages --rotate-fraction 0.5``) whose orientation every (detector,
  classifier) pair reads right (a line no box covers counts as wrong), stored as
  ``path_accuracy["d/c"]``; the classifier's variant accuracy is ``A(d*, c)`` with ``d*`` the
  reference detector of the recognisers' factorisation. Classifier batches are the same
  crops as the recognisers'.
* **providers**: the ONNX Runtime providers each measured session really got.

Resumable: every measured point is saved to ``<out>.cache.json`` as soon as it is done,
keyed by what it depends on (variant settings, model file, pages, repeats, threads, device
choice); a rerun measures only what is missing (``--fresh`` ignores the cache).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from services.common.onnx import create_session
from services.common.processing import make_processor
from services.common.spec import PipelineSpec, VariantSpec, load_spec
from services.planner.profile import (LatencyPoint, PipelineProfile, TaskProfile, VariantProfile,
                                      write_profile)

ROOT_BATCHES = (1, 2, 4, 8)
CHILD_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ProfilerConfig:
    spec: Path
    models: Path
    pages: Path
    out: Path
    n_pages: int = 20
    variants: tuple[str, ...] = ()          # empty: every variant of the spec
    batches: tuple[tuple[str, tuple[int, ...]], ...] = ()   # per-task override
    repeats: int = 10
    warmup: int = 2
    threads: int = 1
    device: str = "cpu"                       # "cpu" | "auto" (CUDA first where present)
    fresh: bool = False
    progress: bool | None = None              # None: only when stderr is a terminal
    orient_pages: Path = Path("data/eval_rot")  # OCR tree: pages with turned lines (cls accuracy)
    command: str = ""                         # recorded in the provenance


# ---------------------------------------------------------------------------
# pure parts: statistics, accuracy factorisation, profile assembly
# ---------------------------------------------------------------------------

def latency_point(samples_ms: Sequence[float]) -> LatencyPoint:
    """p50 and p95 (linear interpolation) of per-batch wall times."""
    a = np.asarray(samples_ms, dtype=float)
    return LatencyPoint(float(np.percentile(a, 50)), float(np.percentile(a, 95)))


def factorise(path_acc: dict[tuple[str, str], float]) -> tuple[dict[str, float], dict[str, float]]:
    """Variant accuracies ``(a_parent, a_child)`` whose product approximates the measured
    two-stage path accuracies ``A(d, r)``.

    Reference factorisation: ``(d*, r*)`` = the most accurate measured pair;
    ``a_child[r] = A(d*, r)`` (the recogniser behind the best detector) and
    ``a_parent[d] = A(d, r*) / A(d*, r*)`` (the detector relative to the best one, read by
    the best recogniser). The product is exact on the row and column of the reference pair,
    equals ``A(d*, r*)`` for the best path, never exceeds 1, and elsewhere assumes the two
    stages' losses are independent; the measured ``A`` overrides it in the planner anyway.
    """
    (d_ref, r_ref), best = max(path_acc.items(), key=lambda kv: (kv[1], kv[0]))
    a_child = {r: a for (d, r), a in path_acc.items() if d == d_ref}
    a_parent = {d: (min(1.0, a / best) if best > 0 else 0.0) for (d, r), a in path_acc.items() if r == r_ref}
    return a_parent, a_child


def build_profile(spec: PipelineSpec, measured: dict[str, dict], fan_out: dict[str, dict[str, float]],
                  path_acc: dict[tuple[str, str], float], device: str, provenance: str,
                  cls_acc: dict[tuple[str, str], float] | None = None) -> PipelineProfile:
    """Assemble a :class:`PipelineProfile` from measurements. ``measured[variant]`` holds
    ``latency`` (batch -> samples ms) and ``providers``; ``cls_acc[(d, c)]`` (OCR tree) the
    orientation accuracy of detector ``d`` then classifier ``c``."""
    a_parent, a_child = factorise(path_acc)
    acc = {**a_parent, **a_child}
    cls_acc = cls_acc or {}
    if cls_acc:
        d_ref = max(path_acc.items(), key=lambda kv: (kv[1], kv[0]))[0][0]
        acc.update({c: a for (d, c), a in cls_acc.items() if d == d_ref})
    tasks = []
    for t in spec.tasks:
        vs = tuple(VariantProfile(name=v.name, task=t.name, accuracy=round(acc[v.name], 6),
                                  latency_ms={int(b): _rounded(latency_point(s))
                                              for b, s in sorted(measured[v.name]["latency"].items(), key=lambda kv: int(kv[0]))},
                                  providers=tuple(measured[v.name]["providers"]))
                   for v in t.variants if v.name in measured)
        fo = {v.name: {c: round(fan_out[v.name][c], 4) for c in t.children} for v in vs} if t.children else {}
        tasks.append(TaskProfile(t.name, vs, tuple(t.children), fo))
    return PipelineProfile(name=spec.name, slo_ms=spec.slo_ms, tasks=tuple(tasks), device=device,
                           provenance=provenance,
                           path_accuracy={f"{d}/{r}": round(a, 6)
                                          for (d, r), a in sorted({**path_acc, **cls_acc}.items())})


def _rounded(p: LatencyPoint) -> LatencyPoint:
    return LatencyPoint(round(p.p50_ms, 3), round(max(p.p95_ms, p.p50_ms), 3))


# ---------------------------------------------------------------------------
# the cache: one JSON file, one entry per measured point
# ---------------------------------------------------------------------------

class PointCache:
    """Measured points keyed by everything they depend on. Saved after every put (atomic
    rename), so an interrupted run loses at most the point in progress."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path.is_file() and not fresh:
            try:
                self.entries = json.loads(path.read_text()).get("entries", {})
            except ValueError:
                self.entries = {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": "pipeserve-profile-cache/1", "entries": self.entries}))
        os.replace(tmp, self.path)


def variant_fingerprint(v: VariantSpec, models: Path) -> str:
    model = models / v.model
    stat = model.stat() if model.is_file() else None
    blob = json.dumps({"v": [v.name, v.model, v.processor, list(v.input_names), list(v.output_names)],
                       "settings": v.settings, "size": stat.st_size if stat else None}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------

class Host:
    """Processors and sessions, loaded lazily once per variant."""

    def __init__(self, spec: PipelineSpec, cfg: ProfilerConfig) -> None:
        self.spec, self.cfg = spec, cfg
        self._loaded: dict[str, tuple[Any, Any, list[str]]] = {}

    def get(self, name: str) -> tuple[Any, Any, list[str]]:
        if name not in self._loaded:
            proc = make_processor(self.spec.variant(name), self.cfg.models, self.spec.plugins)
            sess, providers = create_session(proc.model_path, prefer_gpu=self.cfg.device == "auto",
                                             intra_op_threads=self.cfg.threads)
            self._loaded[name] = (proc, sess, providers)
        return self._loaded[name]

    def providers(self, name: str) -> list[str]:
        return self.get(name)[2]

    def drop(self, name: str) -> None:
        self._loaded.pop(name, None)


def time_batches(proc: Any, session: Any, pool: Sequence[bytes], batch: int, repeats: int,
                 warmup: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Wall ms of ``prepare`` (every item) + ``run_batch`` for ``repeats`` batches of
    ``batch`` payloads, rotating through ``pool``; ``warmup`` untimed batches first."""
    if not pool:
        raise ValueError("no payloads to time")
    out: list[float] = []
    for i in range(warmup + repeats):
        items = [pool[(i * batch + j) % len(pool)] for j in range(batch)]
        t = clock()
        res = proc.run_batch(session, [proc.prepare(x) for x in items])
        dt = (clock() - t) * 1e3
        if len(res) != batch:
            raise RuntimeError(f"{len(res)} results for a batch of {batch}")
        if i >= warmup:
            out.append(dt)
    return out


def _is_ocr(spec: PipelineSpec) -> bool:
    """det -> rec (pipelines/ocr.yaml) or det -> (rec, cls) (pipelines/ocr_tree.yaml)."""
    root = spec.root
    kids = [spec.task(c) for c in root.children]
    return (len(spec.tasks) == 1 + len(kids) and len(kids) in (1, 2)
            and not any(k.children for k in kids)
            and all(v.processor == "ppocr_det" for v in root.variants)
            and all(v.processor == "ppocr_rec" for v in kids[0].variants)
            and all(v.processor == "ppocr_cls" for k in kids[1:] for v in k.variants))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(providers: Iterable[str], threads: int) -> str:
    import onnxruntime as ort

    provs = set(providers)
    if "CUDAExecutionProvider" in provs:
        return f"CUDA GPU (ONNX Runtime {ort.__version__}, CUDAExecutionProvider)"
    return (f"CPU {cpu_model()}, {os.cpu_count()} cores (ONNX Runtime {ort.__version__} CPUExecutionProvider, "
            f"{threads} intra-op thread{'s' if threads != 1 else ''})")


def run(cfg: ProfilerConfig, log: Callable[[str], None] = print) -> PipelineProfile:
    """Measure everything the profile needs (reusing cached points) and write ``cfg.out``."""
    from tqdm import tqdm

    from services.ocr.bench import detection_cer, recognise
    from services.ocr.orientation import orientation_hits
    from services.ocr.pages import load_pages

    spec = load_spec(cfg.spec)
    if not _is_ocr(spec):
        raise SystemExit(f"{cfg.spec}: accuracy is only implemented for the OCR shape "
                         "(one ppocr_det task -> one ppocr_rec task [and one ppocr_cls task])")
    det_task, rec_task = spec.root, spec.task(spec.root.children[0])
    cls_task = spec.task(spec.root.children[1]) if len(spec.root.children) > 1 else None
    known = {v.name for t in spec.tasks for v in t.variants}
    unknown = sorted(set(cfg.variants) - known)
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; the spec has {sorted(known)}")
    pick = lambda t: [v.name for v in t.variants if not cfg.variants or v.name in cfg.variants]  # noqa: E731
    dets, recs = pick(det_task), pick(rec_task)
    clss = pick(cls_task) if cls_task else []
    if not dets or not recs or (cls_task and not clss):
        raise SystemExit("--variants must name at least one variant of every task "
                         f"({det_task.name}: {[v.name for v in det_task.variants]}, "
                         f"{rec_task.name}: {[v.name for v in rec_task.variants]})")
    batches = dict(cfg.batches)
    if set(batches) - {t.name for t in spec.tasks}:
        raise SystemExit(f"--batches names unknown tasks {sorted(set(batches) - {t.name for t in spec.tasks})}")
    det_batches = tuple(batches.get(det_task.name, ROOT_BATCHES))
    rec_batches = tuple(batches.get(rec_task.name, CHILD_BATCHES))
    cls_batches = tuple(batches.get(cls_task.name, CHILD_BATCHES)) if cls_task else ()
    pages = load_pages(cfg.pages)[: cfg.n_pages]
    if not pages:
        raise SystemExit(f"no pages in {cfg.pages} (run `make data`)")
    orient_pages = []
    if cls_task:
        try:
            orient_pages = load_pages(cfg.orient_pages)[: cfg.n_pages]
        except FileNotFoundError:
            raise SystemExit(f"{cfg.orient_pages} has no pages: run `pipeserve-make-pages --out "
                             f"{cfg.orient_pages} --count 20 --seed 1 --rotate-fraction 0.5`") from None
        if not any(ln.angle for p in orient_pages for ln in p.lines):
            raise SystemExit(f"{cfg.orient_pages} has no turned lines (make it with --rotate-fraction)")

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cache = PointCache(cfg.out.with_name(cfg.out.name + ".cache.json"), fresh=cfg.fresh)
    fp = {v: variant_fingerprint(spec.variant(v), cfg.models) for v in dets + recs + clss}
    common = f"pages={cfg.pages.resolve()}:{len(pages)}|threads={cfg.threads}|device={cfg.device}"
    common_rot = f"pages={cfg.orient_pages.resolve()}:{len(orient_pages)}|device={cfg.device}"
    host = Host(spec, cfg)
    units = (len(dets) * (1 + len(recs) + len(clss)) + len(dets) * len(det_batches)
             + len(recs) * len(rec_batches) + len(clss) * len(cls_batches))
    bar = tqdm(total=units, unit="pt", file=sys.stderr,
               disable=not (sys.stderr.isatty() if cfg.progress is None else cfg.progress))

    # -- fan-out and accuracy: every detector on every page, every recogniser on its crops
    fan: dict[str, dict[str, float]] = {}
    path_acc: dict[tuple[str, str], float] = {}
    cls_acc: dict[tuple[str, str], float] = {}
    providers: dict[str, list[str]] = {}
    det_out: dict[str, list] = {}
    for d in dets:
        k_fan = f"fanout|{d}|{fp[d]}|{common}"
        hit = cache.get(k_fan)
        need = [r for r in recs if cache.get(f"cer|{d}|{r}|{fp[d]}|{fp[r]}|{common}") is None]
        if hit is None or need:
            bar.set_description(f"{d} on {len(pages)} pages")
            proc, sess, _ = host.get(d)
            det_out[d] = [proc.run_batch(sess, [proc.prepare(p.png)])[0] for p in pages]
            hit = {"boxes": [len(o.regions) for o in det_out[d]],
                   "children": [len(o.child_payloads) for o in det_out[d]]}
            cache.put(k_fan, hit)
        fan[d] = {t.name: float(np.mean(hit["children"])) for t in (rec_task, cls_task) if t}
        bar.update()
        for r in recs:
            key = f"cer|{d}|{r}|{fp[d]}|{fp[r]}|{common}"
            cers = cache.get(key)
            if cers is None:
                bar.set_description(f"CER {d} + {r}")
                rproc, rsess, _ = host.get(r)
                cers = [detection_cer(o, recognise(rproc, rsess, o.child_payloads), p)
                        for o, p in zip(det_out[d], pages)]
                cache.put(key, cers)
            path_acc[(d, r)] = float(np.clip(1.0 - np.mean(cers), 0.0, 1.0))
            bar.update()
        rot_out = None
        for c in clss:
            key = f"orient|{d}|{c}|{fp[d]}|{fp[c]}|{common_rot}"
            hits = cache.get(key)
            if hits is None:
                bar.set_description(f"orientation {d} + {c}")
                proc, sess, _ = host.get(d)
                if rot_out is None:
                    rot_out = [proc.run_batch(sess, [proc.prepare(p.png)])[0] for p in orient_pages]
                cproc, csess, _ = host.get(c)
                hits = []
                for o, p in zip(rot_out, orient_pages):
                    res = [x for k in range(0, len(o.child_payloads), 16)
                           for x in cproc.run_batch(csess, [cproc.prepare(b) for b in o.child_payloads[k:k + 16]])]
                    hits += orientation_hits([(x.regions[0].label, reg.points) for x, reg in zip(res, o.regions)],
                                             p.lines)
                cache.put(key, [bool(h) for h in hits])
            cls_acc[(d, c)] = float(np.mean(hits))
            bar.update()

    # -- latency: root batches are pages, child batches are crops of the best detector
    measured: dict[str, dict] = {}
    ref_det = max(dets, key=lambda d: (max(path_acc[(d, r)] for r in recs), -dets.index(d)))
    crops: list[bytes] | None = None
    for task_batches, names in ((det_batches, dets), (rec_batches, recs), (cls_batches, clss)):
        for v in names:
            measured[v] = {"latency": {}, "providers": None}
            for b in task_batches:
                key = f"lat|{v}|{b}|{fp[v]}|{common}|repeats={cfg.repeats}|warmup={cfg.warmup}"
                point = cache.get(key)
                if point is None:
                    bar.set_description(f"{v} batch {b}")
                    proc, sess, provs = host.get(v)
                    if v not in dets and crops is None:
                        outs = det_out.get(ref_det)
                        if outs is None:
                            dp, ds, _ = host.get(ref_det)
                            outs = [dp.run_batch(ds, [dp.prepare(p.png)])[0] for p in pages]
                        crops = [c for o in outs for c in o.child_payloads]
                    pool = [p.png for p in pages] if v in dets else crops
                    point = {"samples_ms": time_batches(proc, sess, pool, b, cfg.repeats, cfg.warmup),
                             "providers": provs}
                    cache.put(key, point)
                measured[v]["latency"][b] = point["samples_ms"]
                measured[v]["providers"] = point["providers"]
                bar.update()
            providers[v] = measured[v]["providers"]
            host.drop(v)
    bar.close()

    import onnxruntime as ort

    all_providers = {p for ps in providers.values() for p in ps}
    device = device_name(all_providers, cfg.threads)
    when = _dt.date.today().isoformat()
    provenance = (
        f"measured {when} by `{cfg.command or 'pipeserve-profile'}` on {platform.node() or 'this host'}: "
        f"{len(pages)} pages of {cfg.pages}, ONNX Runtime {ort.__version__}, {cfg.threads} intra-op thread(s). "
        f"latency_ms = wall time of prepare (every item) + run_batch for one batch, p50/p95 over "
        f"{cfg.repeats} batches after {cfg.warmup} warm-up batches; {det_task.name} batches are pages, "
        f"{rec_task.name} batches are crops of {ref_det} from those pages. fan_out = mean boxes per page. "
        f"path_accuracy[d/r] = 1 - mean page CER of d then r; variant accuracies: reference factorisation "
        f"a_r = A(d*, r), a_d = A(d, r*) / A(d*, r*) with (d*, r*) the most accurate pair (docs/planner.md).")
    if cls_task:
        provenance += (
            f" {cls_task.name} batches are the same crops; path_accuracy[d/c] = share of the ground-truth lines "
            f"of {len(orient_pages)} pages of {cfg.orient_pages} (lines turned by 180 degrees) whose orientation "
            f"d then c reads right (a line no box covers counts as wrong); a_c = A(d*, c).")
    profile = build_profile(spec, measured, fan, path_acc, device, provenance, cls_acc)
    write_profile(profile, cfg.out)
    log(summary(profile))
    log(f"wrote {cfg.out} (cache {cache.path})")
    return profile


def summary(p: PipelineProfile) -> str:
    lines = [f"profile {p.name} on {p.device}"]
    for t in p.tasks:
        for v in t.variants:
            lat = "  ".join(f"b{b}: {x.p50_ms:.1f}/{x.p95_ms:.1f}" for b, x in v.latency_ms.items())
            fo = "".join(f"  fan-out {c} {m:.2f}" for c, m in t.fan_out.get(v.name, {}).items())
            lines.append(f"  {v.name:<18} acc {v.accuracy:.4f}{fo}  ms p50/p95 {lat}  [{','.join(v.providers)}]")
    if p.path_accuracy:
        lines.append("  path accuracy (1 - CER; orientation for classifier paths): "
                     + ", ".join(f"{k} {a:.4f}" for k, a in p.path_accuracy.items()))
    return "\n".join(lines)


def _batches(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        task, sizes = text.split("=", 1)
        out = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=1,2,4 got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return task.strip(), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipeserve-profile", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--spec", type=Path, default=Path("pipelines/ocr.yaml"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--eval", dest="pages_dir", type=Path, default=Path("data/eval"),
                    help="evaluation pages with ground truth (default: %(default)s)")
    ap.add_argument("--orient-eval", dest="orient_dir", type=Path, default=Path("data/eval_rot"),
                    help="OCR tree only: pages with lines turned by 180 degrees, for the orientation "
                         "classifier's accuracy (pipeserve-make-pages --rotate-fraction; default: %(default)s)")
    ap.add_argument("--pages", type=int, default=20, help="how many evaluation pages (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("profiles/ocr_cpu.json"))
    ap.add_argument("--variants", nargs="+", default=(), help="measure only these variants (default: all)")
    ap.add_argument("--batches", type=_batches, action="append", default=[], metavar="TASK=B1,B2,...",
                    help=f"batch sizes of a task (default: root {ROOT_BATCHES}, others {CHILD_BATCHES})")
    ap.add_argument("--repeats", type=int, default=10, help="timed batches per batch size (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, as workers use (default: 1)")
    ap.add_argument("--device", choices=("cpu", "auto"), default="cpu",
                    help="auto: CUDA first where present, as workers do (default: %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="ignore the cache next to --out")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0 or a.pages < 1:
        ap.error("--repeats and --pages must be >= 1, --warmup >= 0")
    cfg = ProfilerConfig(spec=a.spec, models=a.models, pages=a.pages_dir, out=a.out, n_pages=a.pages,
                         variants=tuple(a.variants), batches=tuple(a.batches), repeats=a.repeats,
                         warmup=a.warmup, threads=a.threads, device=a.device, fresh=a.fresh,
                         orient_pages=a.orient_dir,
                         command=" ".join(["pipeserve-profile", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]))
    t0 = time.perf_counter()
    run(cfg)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
