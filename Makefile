# MoLE-Flow developer commands. `make test` installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch pair that installs on our CPU machines; users elsewhere may use any torch>=2.3.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all lint demo train-generated train bench quality tables routing-study clean

$(VENV)/.install-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev,demo,anomalib,cluster,export]"
	touch $@

install: $(VENV)/.install-stamp  ## create .venv and install the package with its test and demo extras

test: install  ## the fast test suite (what CI runs)
	$(PY) -m pytest -q

test-all: install  ## every test, the slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

lint: install
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

demo: install  ## the main job: MoLE-Flow on real solar-cell images, pretrained backbone, offline (run time: README, Quick start)
	$(PY) src/train.py experiment=demo

train-generated: install  ## the main job on generated data (tiny random backbone; run time: README)
	$(PY) src/train.py experiment=generated_quick

train: install  ## MAIN on MVTec AD: make train DATA=/path/to/mvtec_ad
	$(PY) src/train.py data.root=$(DATA)

clean:
	rm -rf logs .pytest_cache .ruff_cache

bench: install  ## performance benchmark (issue 8): logs/bench/<time>/bench.{json,md}; BENCH_ARGS=--quick for a short try
	$(PY) -m experiments.bench $(BENCH_ARGS)

quality: install  ## detection quality beside anomalib PatchCore on the dev benchmark's test parts: logs/quality/<time>/; QUALITY_ARGS=--split validation, --budget, ... (clones in data/: docs/data.md)
	$(PY) -m experiments.quality $(QUALITY_ARGS)

tables: install  ## the study's tables from finished runs: make tables RUNS=logs/<table>/multiruns/<time> [TABLE_ARGS=--reference]
	$(PY) -m experiments.tables $(RUNS) $(TABLE_ARGS)

routing-study: install  ## routing of each task's test images by every router, on cached features (ROUTING_ARGS=...)
	$(PY) -m experiments.routing_study $(ROUTING_ARGS)
