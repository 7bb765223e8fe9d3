"""`make gpu-check` fails clearly on a host without an NVIDIA GPU, and the GPU pins agree.

On a host with a GPU (nvidia-smi present) the no-GPU checks are skipped: there the check
itself is the test (`make gpu-check`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.tools import bare_ort, gpu_check

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
no_gpu_here = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has nvidia-smi")


@no_gpu_here
def test_the_script_stops_at_once_without_a_gpu():
    env = {**os.environ, "PATH": "/usr/bin:/bin"}   # no venv: it must not get as far as installing
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == gpu_check.NO_GPU, out.stdout + out.stderr
    assert "gpu-check: FAILED: no NVIDIA GPU on this host" in out.stderr
    assert "make" not in out.stdout   # nothing was set up


@no_gpu_here
def test_the_module_says_no_gpu_and_writes_the_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.tools.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == gpu_check.NO_GPU, out.stdout + out.stderr
    assert "== gpu-check: FAILED ==" in out.stdout and "no NVIDIA GPU on this host" in out.stdout
    assert '"exit_status": 2' in (tmp_path / "summary.json").read_text()


def test_a_driver_that_finds_no_gpu_fails_as_no_gpu(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\"'\"'t communicate with the NVIDIA driver.'\nexit 9\n")
    smi.chmod(0o755)
    with pytest.raises(gpu_check.CheckFailed) as exc:
        gpu_check.find_gpu(str(smi))
    assert exc.value.code == gpu_check.NO_GPU and "couldn't communicate with the NVIDIA driver" in str(exc.value)


def test_the_cpu_build_of_onnxruntime_is_named_as_the_reason():
    import onnxruntime as ort

    if gpu_check.CUDA in ort.get_available_providers():
        pytest.skip("this venv has the CUDA provider")
    with pytest.raises(gpu_check.CheckFailed) as exc:
        gpu_check.onnxruntime_package()
    assert exc.value.code == gpu_check.NO_CUDA
    assert "has no CUDAExecutionProvider" in str(exc.value) and "make gpu-check" in str(exc.value) and "[gpu-cuda12]" in str(exc.value)


def test_the_workers_providers_are_read_from_their_logs(tmp_path):
    (tmp_path / "worker-det-0.log").write_text(
        "2026-12-01T08:28:05Z [info     ] variant_loaded   batch_size=8 load_ms=124.2 plan_version=1 "
        "providers=['CUDAExecutionProvider', 'CPUExecutionProvider'] service=worker task=det "
        "variant=det_v6small_640 worker_id=det-0\n")
    (tmp_path / "worker-rec-0.log").write_text(
        '{"event": "variant_loaded", "variant": "rec_v6tiny", "providers": ["CPUExecutionProvider"]}\n')
    assert gpu_check.worker_providers(tmp_path) == {
        "det_v6small_640": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "rec_v6tiny": ["CPUExecutionProvider"]}


def test_both_cuda_lines_have_an_extra_and_the_image_matches_its_default():
    """onnxruntime-gpu 1.20-1.26 on PyPI are built for CUDA 12.x + cuDNN 9.x (their `cuda`
    extra requires nvidia-*-cu12); 1.27 moved to CUDA 13. `gpu` is the CUDA 13 line,
    `gpu-cuda12` the CUDA 12 one, and no extra mixes a GPU build with the CPU build. The
    image's default base carries CUDA 13 for the default `gpu` extra; its CUDA 12 build
    argument names the CUDA 12 extra (docs/gpu.md)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["onnxruntime-gpu>=1.27"]
    [cu12] = extras["gpu-cuda12"]
    assert re.fullmatch(r"onnxruntime-gpu>=1\.2\d,<1\.27", cu12), cu12
    for name, reqs in extras.items():
        builds = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs} & {"onnxruntime", "onnxruntime-gpu"}
        assert len(builds) <= 1, (name, reqs)
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-(\S+)$", text, re.M)
    assert image and image.group(1) == "13", "the default base image must carry CUDA 13 for the [gpu] extra"
    assert re.search(r"^ARG GPU_EXTRA=gpu$", text, re.M)
    assert "CUDA_IMAGE=nvidia/cuda:12." in text and "GPU_EXTRA=gpu-cuda12" in text
    doc = (ROOT / "docs" / "gpu.md").read_text()
    assert "1.27" in doc and "580" in doc and "525" in doc and "gpu-cuda12" in doc


# -- which line: nvidia-smi's CUDA version ------------------------------------------------

SMI_13 = ("+-----------------------------------------------------------------------------------------+\n"
          "| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |\n")
SMI_12 = "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n"


def test_the_driver_s_cuda_version_picks_the_extra():
    assert gpu_check.cuda_extra(SMI_13) == "gpu"
    assert gpu_check.cuda_extra(SMI_13.replace("13.0", "13.1")) == "gpu"
    assert gpu_check.cuda_extra(SMI_12) == "gpu-cuda12"
    assert gpu_check.cuda_extra(SMI_13, override="12") == "gpu-cuda12"    # CUDA=12 wins
    assert gpu_check.cuda_extra("", override="13") == "gpu"
    with pytest.raises(ValueError, match="needs CUDA 12"):
        gpu_check.cuda_extra(SMI_12.replace("12.4", "11.8"))
    with pytest.raises(ValueError, match="set CUDA=12 or CUDA=13"):
        gpu_check.cuda_extra("NVIDIA-SMI has failed")
    with pytest.raises(ValueError, match="give 12 or 13"):
        gpu_check.cuda_extra(SMI_13, override="11")


def test_print_extra_reads_nvidia_smi_and_honours_cuda(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '" + SMI_12.strip() + "'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CUDA": ""}

    def extra(**kw):
        return subprocess.run([sys.executable, "-m", "services.tools.gpu_check", "--print-extra"], cwd=ROOT,
                              env={**env, **kw}, capture_output=True, text=True, timeout=60)

    assert extra().stdout.strip() == "gpu-cuda12"
    assert extra(CUDA="13").stdout.strip() == "gpu"
    bad = extra(CUDA="9")
    assert bad.returncode == gpu_check.NO_CUDA and "give 12 or 13" in bad.stderr


# -- the verdict: gpu-check can fail --------------------------------------------------------

def profile(points: dict[int, tuple[float, float]], name="rec_v6small") -> dict:
    return {"tasks": [{"name": "rec", "variants": [
        {"name": name, "latency_ms": {str(b): {"p50_ms": p50, "p95_ms": p95} for b, (p50, p95) in points.items()}}]}]}


WARM = profile({1: (4.0, 4.6), 2: (6.7, 7.5), 4: (9.0, 10.1), 8: (13.0, 14.2)})
GOOD_DEMO = {"slo_violation_ratio": 0.004, "ok": 249, "sent": 250}
ON_GPU = {"rec_v6small": [gpu_check.CUDA, "CPUExecutionProvider"]}


def test_a_healthy_run_passes():
    assert gpu_check.verdict(GOOD_DEMO, ON_GPU, WARM) == []
    assert gpu_check.verdict(None, None, WARM) == []      # --skip-demo: the profile alone is judged


def test_the_demo_missing_its_slo_fails_the_check():
    """The GPU run: 1 of 402 OK, 99.75 % violations, and gpu-check printed PASSED."""
    [(code, why)] = gpu_check.verdict({"slo_violation_ratio": 0.9975, "ok": 1, "sent": 402}, ON_GPU, WARM)
    assert code == gpu_check.VERDICT_FAILED and "missed its SLO: 99.75 % violations" in why.replace("%", " %")
    [(_, why)] = gpu_check.verdict({"slo_violation_ratio": 0.01, "ok": 99, "sent": 100}, ON_GPU, WARM)
    assert "1.00%" in why                                   # 1 % is already a miss
    assert gpu_check.verdict({"slo_violation_ratio": 0.0099}, ON_GPU, WARM) == []


def test_a_worker_on_the_cpu_provider_fails_the_check():
    [(code, why)] = gpu_check.verdict(GOOD_DEMO, {**ON_GPU, "det_v6small_640": ["CPUExecutionProvider"]}, WARM)
    assert code == gpu_check.NO_CUDA and "det_v6small_640" in why and "rec_v6small" not in why
    [(code, why)] = gpu_check.verdict(GOOD_DEMO, {}, WARM)
    assert code == gpu_check.NO_CUDA and "variant_loaded" in why


def test_a_bimodal_profile_fails_the_check():
    """The GPU run's rec_v6small: 6.7 ms at batch 2, 2,890 ms at batch 4, 13 ms at batch 8,
    p95 2,311 ms at batch 8."""
    run = profile({1: (4.0, 4.6), 2: (6.7, 7.5), 4: (2890.0, 3100.0), 8: (13.0, 2311.0)})
    [(code, why)] = gpu_check.verdict(GOOD_DEMO, ON_GPU, run)
    assert code == gpu_check.VERDICT_FAILED and "bimodal" in why
    assert "rec_v6small batch 8: p95 2311.0 ms > 1.5x p50 13.0 ms" in why
    assert "rec_v6small: batch 4 (2890.0 ms) > 2x batch 8 (13.0 ms)" in why


def test_each_profile_rule_alone():
    spread = profile({1: (4.0, 6.1), 2: (6.7, 7.5)})                 # p95 1.53x p50 at batch 1
    assert gpu_check.profile_problems(spread) == ["rec_v6small batch 1: p95 6.1 ms > 1.5x p50 4.0 ms"]
    assert gpu_check.profile_problems(profile({1: (4.0, 6.0)})) == []   # 1.5x exactly is fine
    slower = profile({2: (14.0, 15.0), 4: (9.0, 10.0), 8: (6.9, 7.0)})   # batch 2 > 2x batch 8
    assert gpu_check.profile_problems(slower) == ["rec_v6small: batch 2 (14.0 ms) > 2x batch 8 (6.9 ms)"]
    assert gpu_check.profile_problems(profile({2: (13.0, 14.0), 8: (6.9, 7.0)})) == []   # 1.9x: noise


def test_the_summary_says_failed_with_every_reason():
    s = {"ok": False, "error": "x; y", "reasons": ["the demo missed its SLO: 99.75% violations",
                                                  "the GPU profile is bimodal (1 points): ..."],
         "steps": {"bare": {"variants": {"det": "det_v6small_320:8", "rec": "rec_v6tiny:4"}, "pages_per_s": 40.0,
                            "cluster_pages_per_s": 30.0, "cluster_over_bare": 0.75}}}
    text = gpu_check.format_summary(s)
    assert text.splitlines()[0] == "== gpu-check: FAILED =="
    assert "FAILED         the demo missed its SLO" in text and "FAILED         the GPU profile is bimodal" in text
    assert "40.00 pages/s (det_v6small_320:8, rec_v6tiny:4); cluster 30.00 pages/s on time = 75% of it " \
           "[reported, not judged]" in text


def test_a_pass_without_the_demo_does_not_read_as_a_plain_pass():
    """--skip-demo stops after the profile: the SLO was never judged, and the headline says so."""
    s = {"ok": True, "skipped": ["demo", "bare"], "steps": {}}
    head = gpu_check.format_summary(s).splitlines()[0]
    assert head != "== gpu-check: PASSED =="
    assert "profile only" in head and "not judged" in head
    assert gpu_check.format_summary({"ok": True, "steps": {}}).splitlines()[0] == "== gpu-check: PASSED =="


# -- the bare ONNX Runtime pipeline ---------------------------------------------------------

def test_the_bare_pipeline_takes_the_demo_s_most_used_variants():
    task_of = {"det_v6small_320": "det", "det_v6tiny_320": "det", "rec_v6tiny": "rec"}
    report = {"variant_paths": {"det_v6small_320/rec_v6tiny": 200, "det_v6tiny_320/rec_v6tiny": 49},
              "final_plan": {"workers": {
                  "det-0": {"task": "det", "variant": "det_v6small_320", "batch_size": 4},
                  "det-1": {"task": "det", "variant": "det_v6small_320", "batch_size": 8},
                  "rec-0": {"task": "rec", "variant": "rec_v6tiny", "batch_size": 16}}}}
    assert bare_ort.variants_from_report(report, task_of) == {"det": ("det_v6small_320", 8),
                                                              "rec": ("rec_v6tiny", 16)}
    # the most used detector was left before the end: its task's batch size in the final plan
    report["variant_paths"]["det_v6tiny_320/rec_v6tiny"] = 300
    assert bare_ort.variants_from_report(report, task_of)["det"] == ("det_v6tiny_320", 8)
    with pytest.raises(ValueError, match="no OK answers"):
        bare_ort.variants_from_report({"variant_paths": {}}, task_of)
    assert bare_ort.parse_variants("det_v6small_320:8, rec_v6tiny:4") == [("det_v6small_320", 8), ("rec_v6tiny", 4)]
    with pytest.raises(ValueError):
        bare_ort.parse_variants("det_v6small_320")


def test_the_script_picks_the_line_before_installing_and_refuses_an_old_driver(tmp_path):
    """scripts/gpu_check.sh asks nvidia-smi's CUDA version which extra to install; a CUDA 11
    driver stops it before `make setup`, with the reason."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in\n  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)" ;;\n'
                   '  --query-gpu*) echo "NVIDIA H200, 470.57.02, 143771 MiB" ;;\n'
                   '  *) echo "| NVIDIA-SMI 470.57.02    Driver Version: 470.57.02    CUDA Version: 11.4 |" ;;\nesac\n')
    smi.chmod(0o755)
    make = tmp_path / "make"          # must not be reached
    make.write_text("#!/bin/sh\necho MAKE-RAN \"$@\"\nexit 99\n")
    make.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": sys.executable, "CUDA": ""}
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == gpu_check.NO_CUDA, out.stdout + out.stderr
    assert "the driver supports CUDA 11.4" in out.stderr and "MAKE-RAN" not in out.stdout
    env["CUDA"] = "12"                 # the override picks the CUDA 12 line and its own venv
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert "the [gpu-cuda12] extra (CUDA 12) in .venv-gpu-cuda12" in out.stdout, out.stdout + out.stderr
    assert "MAKE-RAN setup VENV=.venv-gpu-cuda12 EXTRA=gpu-cuda12" in out.stdout


def fake_gpu_run(monkeypatch, tmp_path, profile_json: dict, demo_json: dict, providers: list[str]):
    """main() with every GPU step faked (no GPU here): what the verdict gets and prints."""
    (tmp_path / "pages").mkdir(parents=True)
    (tmp_path / "pages" / "p000.png").write_bytes(b"png")
    monkeypatch.setattr(gpu_check, "find_gpu", lambda: ["NVIDIA H200, 580.95.05, 143771 MiB"])
    monkeypatch.setattr(gpu_check, "onnxruntime_package", lambda: ("1.31.1", ["onnxruntime-gpu 1.31.1"]))
    monkeypatch.setattr(gpu_check, "check_models", lambda *a: [
        gpu_check.ModelCheck("rec_v6small", "m.onnx", [gpu_check.CUDA], True, 4.0)])
    monkeypatch.setattr(gpu_check, "bare_step", lambda *a: {
        "variants": {"det": "det_v6small_320:8"}, "pages_per_s": 50.0, "cluster_pages_per_s": 40.0,
        "cluster_over_bare": 0.8})

    def run(cmd, what, log):
        out = tmp_path / "out"
        if what == "profile":
            (out / "ocr_gpu.json").write_text(json.dumps({**profile_json, "device": f"H200 ({gpu_check.CUDA})"}))
        else:
            (out / "demo.json").write_text(json.dumps(demo_json))
            (out / "demo-logs").mkdir()
            (out / "demo-logs" / "worker-rec-0.log").write_text(json.dumps(
                {"event": "variant_loaded", "variant": "rec_v6small", "providers": providers}) + "\n")

    monkeypatch.setattr(gpu_check, "_run", run)
    code = gpu_check.main(["--out", str(tmp_path / "out"), "--pages", str(tmp_path / "pages")])
    return code, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_the_whole_check_fails_on_the_gpu_run_s_findings_and_passes_a_healthy_one(monkeypatch, tmp_path, capsys):
    bimodal = profile({2: (6.7, 7.5), 4: (2890.0, 3100.0), 8: (13.0, 2311.0)})
    code, s = fake_gpu_run(monkeypatch, tmp_path / "bad", bimodal,
                           {"slo_violation_ratio": 0.9975, "ok": 1, "sent": 402}, [gpu_check.CUDA])
    out = capsys.readouterr().out
    assert code == gpu_check.VERDICT_FAILED and not s["ok"] and len(s["reasons"]) == 2
    assert "== gpu-check: FAILED ==" in out and "FAILED         the demo missed its SLO" in out
    assert "FAILED         the GPU profile is bimodal" in out
    code, s = fake_gpu_run(monkeypatch, tmp_path / "cpu", WARM, GOOD_DEMO, ["CPUExecutionProvider"])
    assert code == gpu_check.NO_CUDA and "worker sessions not on CUDAExecutionProvider" in s["error"]
    code, s = fake_gpu_run(monkeypatch, tmp_path / "good", WARM, GOOD_DEMO, [gpu_check.CUDA])
    out = capsys.readouterr().out
    assert code == 0 and s["ok"] and "== gpu-check: PASSED ==" in out and "= 80% of it" in out
