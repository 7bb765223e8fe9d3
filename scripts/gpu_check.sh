#!/usr/bin/env bash
# make gpu-check: on a host with an NVIDIA GPU, install the [gpu] extra (CUDA 13) or the
# [gpu-cuda12] extra, as the driver's CUDA version says (CUDA=12|13 overrides), into its
# own venv (.venv-gpu or .venv-gpu-cuda12: onnxruntime-gpu never shares a venv with
# onnxruntime), then run services/tools/gpu_check.py there: every model on the CUDA
# provider, a GPU profile, the demo on it, the bare ONNX Runtime pipeline, the verdict
# (runs/gpu-check/summary.json). Arguments go to gpu_check.py.
#
# Without an NVIDIA GPU it stops at once, before installing anything, with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: FAILED: no NVIDIA GPU on this host: nvidia-smi (the NVIDIA driver's tool) is not" \
       "installed. Run it on a host with an NVIDIA GPU and its driver." >&2
  exit 2
fi
if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  echo "gpu-check: FAILED: nvidia-smi lists no GPU (is the driver loaded?):" >&2
  nvidia-smi -L >&2 || true
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# Which onnxruntime-gpu line: the driver's CUDA version (nvidia-smi's header) picks the
# extra, CUDA=12|13 overrides it: `gpu` (onnxruntime-gpu >= 1.27, CUDA 13, driver >= 580) or
# `gpu-cuda12` (1.20-1.26, CUDA 12, driver >= 525). Each line gets its own venv.
EXTRA="$(CUDA="${CUDA:-}" "$PYTHON" -m services.tools.gpu_check --print-extra)" || exit $?
GPU_VENV="${GPU_VENV:-.venv-$EXTRA}"
echo "gpu-check: the [$EXTRA] extra (CUDA ${CUDA:-from nvidia-smi}) in $GPU_VENV"

# the same set-up as `make setup`, in the GPU venv; models and pages are shared and kept
make setup VENV="$GPU_VENV" EXTRA="$EXTRA" PYTHON="$PYTHON"
exec "$GPU_VENV/bin/python" -m services.tools.gpu_check "$@"
