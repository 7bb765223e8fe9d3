"""`make gpu-check` fails clearly on a host without an NVIDIA GPU, and the GPU pins agree.

On a host with a GPU (nvidia-smi present) the no-GPU checks are skipped: there the check
itself is the test (`make gpu-check`)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.tools import gpu_check

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
    assert "has no CUDAExecutionProvider" in str(exc.value) and "[gpu] extra" in str(exc.value)


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


def test_the_gpu_extra_and_the_image_agree_on_cuda_12():
    """onnxruntime-gpu 1.20-1.26 on PyPI are built for CUDA 12.x + cuDNN 9.x (their `cuda`
    extra requires nvidia-*-cu12); 1.27 moved to CUDA 13. The image must carry CUDA 12 +
    cuDNN, and the pin must stay below 1.27 (docs/gpu.md)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [gpu] = extras["gpu"]
    assert re.fullmatch(r"onnxruntime-gpu>=1\.2\d,<1\.27", gpu), gpu
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-(\S+)$",
                      (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    assert image and image.group(1) == "12", "the base image must carry CUDA 12.x for onnxruntime-gpu <1.27"
    assert "1.27" in (ROOT / "docs" / "gpu.md").read_text()
