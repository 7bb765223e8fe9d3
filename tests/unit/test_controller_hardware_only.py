"""The controller's ``--hardware-only`` flag: a floor at the best accuracy the profile
reaches within the SLO, so the planner adds replicas of the most accurate variants and
sheds beyond them instead of switching to cheaper ones (the baseline of docs/evaluation.md)."""
from __future__ import annotations

from pathlib import Path

from services.common.plan import RegisteredWorker
from services.controller.main import full_accuracy_floor, parse_config
from services.planner import load_profile
from services.policy.planning import PlannerPolicy

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "ocr_cpu.json"


def test_the_flag_is_parsed_and_off_by_default():
    base = ["--spec", "pipelines/ocr.yaml", "--profile", str(PROFILE)]
    assert parse_config(base).hardware_only is False
    assert parse_config([*base, "--hardware-only"]).hardware_only is True


def test_the_floor_is_the_best_path_accuracy():
    profile = load_profile(PROFILE)
    best = max(v.accuracy for v in profile.task("det").variants) * \
        max(v.accuracy for v in profile.task("rec").variants)
    floor = full_accuracy_floor(profile, 1500.0)
    assert best * (1 - 1e-5) < floor < best


def test_under_overload_the_floor_keeps_the_most_accurate_variants_and_sheds():
    profile = load_profile(PROFILE)
    workers = [RegisteredWorker(f"pool-{i}", f"127.0.0.1:{5000 + i}", "") for i in range(3)]
    floor = full_accuracy_floor(profile, 1500.0)
    free = PlannerPolicy(profile, 1500.0, verbose=False).decide(workers, 50.0, None, now=0.0)
    held = PlannerPolicy(profile, 1500.0, verbose=False, min_accuracy=floor).decide(workers, 50.0, None, now=0.0)
    best = {t.name: max(t.variants, key=lambda v: v.accuracy).name for t in profile.tasks}
    assert {w.variant for w in held.workers.values()} <= set(best.values())
    assert held.admission_rate_qps is not None and held.admission_rate_qps < 50.0   # it sheds
    assert {w.variant for w in free.workers.values()} - set(best.values())          # the planner does not
