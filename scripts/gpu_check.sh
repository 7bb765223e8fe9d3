#!/usr/bin/env bash
# make gpu-check: on a host with an NVIDIA GPU, install the [gpu] extra into its own venv
# (.venv-gpu: onnxruntime-gpu never shares a venv with onnxruntime), then run
# services/tools/gpu_check.py there: every model on the CUDA provider, a GPU profile, the
# demo on it, one summary (runs/gpu-check/summary.json). Arguments go to gpu_check.py.
#
# Without an NVIDIA GPU it stops at once, before installing anything, with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_VENV="${GPU_VENV:-.venv-gpu}"
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

# the same set-up as `make setup`, in the GPU venv; models and pages are shared and kept
make setup VENV="$GPU_VENV" EXTRA=gpu PYTHON="$PYTHON"
exec "$GPU_VENV/bin/python" -m services.tools.gpu_check "$@"
