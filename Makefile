# RLHF on DeepSpeed. `make help` lists the targets.
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=
SWEEP  ?= zero_offload
SIZE   ?= full
RUNS   ?= 2
# pytest workers: one per core, at most 4 (each test pins one torch thread; two-rank tests start two more)
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(PY) -m pytest -q --durations=15 -n $(TEST_JOBS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast bench sweep clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 numpy
	# DeepSpeed builds against the torch above (no isolated build env that would fetch another torch).
	$(PIP) install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) ## create the environment (.venv): CPU torch, then the project and its deps

run: $(STAMP) ## run the main job on the embedded tiny default (ARGS="key=value ..." to override)
	$(PY) run.py $(ARGS)

test: $(STAMP) ## run the whole test suite
	$(PYTEST) $(ARGS)

test-fast: $(STAMP) ## run the tests without the slow end-to-end ones
	$(PYTEST) -m "not slow" $(ARGS)

$(VENV)/.bench: $(STAMP)
	# TRL without its dependencies: everything it needs is already installed (no other torch)
	$(PIP) install -q --no-deps "trl==1.16.0"
	touch $@

bench: $(VENV)/.bench ## ours vs TRL on SFT, RM, DPO, step 3 (SIZE=smoke|full RUNS=2; JSON + table.md under bench-results/)
	$(PY) -m bench --size $(SIZE) --runs $(RUNS) $(ARGS)

sweep: $(STAMP) ## any sweep (default the ZeRO/offload one): make sweep SWEEP=lora_rank ARGS="model=opt-1.3b hardware=a6000"
	$(PY) run.py -m sweep=$(SWEEP) $(ARGS)

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .cache outputs multirun bench-results .pytest_cache
