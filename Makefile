# lmforge: `make demo` and `make test` each build .venv when it is missing (and refresh it when
# pyproject.toml changes), then run. torch is installed first, pinned, so that nothing pulls
# another build of it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
# torchao for the float8 test (tests/test_fastpaths.py), in .venv/float8 rather than the venv's
# site-packages: importable everywhere, peft and transformers load it in every process and print
# its kernel-loading warnings on every command's stderr. `train.precision=fp8` users install the
# extra lmforge[fp8] instead.
TORCHAO ?= torchao==0.18.0
export LMFORGE_CACHE ?= $(CURDIR)/.cache/lmforge
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo scaling-demo test test-fast bench bench-gpu lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[deepspeed,dev,data]'
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/float8 $(TORCHAO)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lmforge.launcher.demo

# The scaling-law sweep on CPU (configs/scaling/demo.yaml): prepare, train the IsoFLOP grid
# (finished runs are skipped on a rerun), fit the smaller budgets, predict the largest, finetune
# each budget's best run on the demo task (accuracy against compute); then how well each run's
# final loss is predicted from its start, and the plan of a 1e13-FLOP run.
scaling-demo: $(STAMP)
	@test -f data/demo/rotten_tomatoes/test.csv || $(BIN)/python -m lmforge.finetune.bundled --out data/demo/rotten_tomatoes
	@test -f data/scaling/manifest.json || $(BIN)/lmforge prepare configs/prepare/scaling.yaml
	$(BIN)/lmforge scaling sweep configs/scaling/demo.yaml
	$(BIN)/lmforge runs --predict-check runs/scaling-demo --fractions 0.2,0.3,0.5
	OMP_NUM_THREADS=1 $(BIN)/lmforge plan --flops 1e13 --fit runs/scaling-demo --probe

# --durations: the slowest tests, so that the suite's time stays in view (goal: 25 minutes idle).
# (Two pytest-xdist workers were measured slower here: two 2-rank runs on 2 cores contend.)
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

# lmforge next to the floor (a hand-written loop), itself with torch.compile and transformers'
# Llama, small and base-125m in bf16 (under 10 minutes on 2 CPU cores).
bench: $(STAMP)
	$(BIN)/lmforge bench --peers --compile --models small,base-125m --precisions bf16 --steps 2 \
		--out BENCHMARKS.latest.md

# On one CUDA GPU (under 10 minutes on an H100/H200): base-125m, 350m and llama-1b at sequence
# 2048 in eager bf16, with torch.compile, and with compile and float8 (needs torchao).
bench-gpu: $(STAMP)
	$(BIN)/lmforge bench --gpu --out BENCHMARKS.gpu.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs data/demo data/scaling .cache .pytest_cache
