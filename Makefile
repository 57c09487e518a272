# Two commands on a fresh machine: `make run` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/minilm-ner-wnut16.yaml
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (never both in one environment).
GPU ?= 0
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.installed-$(ORT_EXTRA)
ARGS ?=

.PHONY: setup run test test-all check clean finetune prune export optimize quantize list gate verify baseline

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (on this machine it is a local file); a plain `pip install torch`
	# would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# Exactly one ONNX Runtime build: remove the other one if a previous setup installed it.
	$(PY) -m pip uninstall --quiet --yes $(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu) >/dev/null 2>&1 || true
	$(PY) -m pip install --quiet -e ".[$(ORT_EXTRA),dev]"
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(PY) -m pipeline run $(RECIPE) $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "" $(ARGS)

check: setup
	$(PY) -m pipeline check recipes/*.yaml

list: setup
	$(PY) -m pipeline list

# CI gate on RECIPE's report (exit 3 on failure); BASELINE=old-report.json compares ratios against it.
gate: setup
	$(PY) -m pipeline gate $(RECIPE) $(if $(BASELINE),--baseline $(BASELINE)) --junit exported/gate-junit.xml

verify: setup
	$(PY) -m pipeline verify exported/$(notdir $(basename $(RECIPE)))/release

# Refresh the committed baseline that `make test` gates its reduced end-to-end run against.
baseline: setup
	PIPELINE_WRITE_BASELINE=1 $(PY) -m pytest -q tests/test_end_to_end.py

# One target per stage: run each variant of RECIPE up to and including that stage.
finetune prune export optimize quantize: setup
	$(PY) -m pipeline run $(RECIPE) --until $@ $(ARGS)

clean:
	rm -rf exported/*/ .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
