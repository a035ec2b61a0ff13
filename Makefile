# ddpm-pipeline: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch with torchvision (the Inception FID path needs torchvision); override TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (0 = one process); each test file runs whole on one worker (tests/conftest.py)
TEST_WORKERS ?= 2
# `make sample` overrides (empty = the params.yaml `sample` section)
SAMPLER ?=
STEPS ?=
ETA ?=
N ?=
SEED ?=
PRECISION ?=
LABELS ?=
GUIDANCE ?=
MODEL ?= outputs/model/model.pt
OUT ?= outputs/make_sample
# `make inpaint`: the region to generate (left|right|top|bottom|center or a black-and-white PNG, white generated),
# an npz of images to complete (default: the test split) and RePaint's jumps and passes (default: params.yaml)
MASK ?=
IMAGES ?=
JUMPS ?=
RESAMPLE ?=
# the team stack (pipeline.stack): its folder, and e.g. STACK_ARGS="--mlflow-port 5051 --host 0.0.0.0"
STACK_DIR ?= .stack
STACK_ARGS ?=
# `make train-node`: this host's rank among train.num_nodes, and node 0's address and rendezvous port
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
# `make deploy`: the repository and branch the workers clone (default: this clone's origin and branch)
DDPM_GIT_URL ?= $(shell git remote get-url origin 2>/dev/null)
DDPM_GIT_BRANCH ?= $(shell git rev-parse --abbrev-ref HEAD 2>/dev/null)
# Run stages with the project's interpreter (dvc.yaml commands call `python`).
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The OpenMP environment (GOMP_SPINCOUNT unless OMP_WAIT_POLICY is set) comes from pipeline.bound_openmp_spin,
# which every pipeline process, the tests and the benchmarks run before torch loads.

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint repro smoke sample inpaint metrics plots clean ui prefect-server serve deploy bench bench-team bench-workers bench-conditional bench-ttf bench-native \
	stack-up stack-down stack-status stack-env push pull train-node

help: ## show this list of targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-15s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,inception,team]"
	touch $@

# The native GroupNorm+SiLU, attention and Winograd convolution kernels (ddpm.kernels), built once per torch
# installation and CPU into ~/.cache; where they cannot be built, PyTorch's ops run instead.
install: $(VENV)/.installed ## create .venv and install the package with its dev tools (and build the native kernels)
	@$(PY) -c 'from ddpm.kernels import main; main()' || true

test: install ## run the whole test suite (what CI runs)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-fast: install ## the unit tests, for the edit loop: all but the `slow` ones (no DVC, servers or subprocess runs)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

repro: install ## run the whole DVC pipeline (prepare -> featurizer -> train -> sample -> evaluate)
	$(RUN) dvc repro

smoke: install ## the pipeline on the smoke configuration (8x8 digits, about 3 min) as a DVC experiment
	$(RUN) sh -c 'flags=$$(python -m pipeline.overrides configs/smoke.yaml) && eval "dvc exp run $$flags"'

sample: install ## draw new images: make sample SAMPLER=dpmpp_2m STEPS=15 N=64 SEED=1 [PRECISION=bf16-mixed] [LABELS=7|3,5|balanced GUIDANCE=2] [MODEL=champion|models:/..|runs:/..]
	$(RUN) python -m pipeline.sample --model $(MODEL) --out $(OUT) \
	  $(if $(SAMPLER),--sampler $(SAMPLER)) $(if $(STEPS),--steps $(STEPS)) $(if $(ETA),--eta $(ETA)) \
	  $(if $(N),--n $(N)) $(if $(SEED),--seed $(SEED)) $(if $(PRECISION),--precision $(PRECISION)) \
	  $(if $(LABELS),--labels $(LABELS)) $(if $(GUIDANCE),--guidance $(GUIDANCE))

inpaint: install ## complete test images under a mask: make inpaint MASK=left|right|top|bottom|center|mask.png [N=8] [JUMPS=5 RESAMPLE=5] [GUIDANCE=2] [IMAGES=x.npz] -> outputs/inpaint
	@test -n "$(MASK)" || { echo "error: MASK is required: left, right, top, bottom, center or a PNG file" >&2; exit 2; }
	$(RUN) python -m pipeline.inpaint --mask $(MASK) --model $(MODEL) $(if $(filter outputs/model/model.pt,$(MODEL)),--track) \
	  $(if $(N),--n $(N)) $(if $(SEED),--seed $(SEED)) $(if $(SAMPLER),--sampler $(SAMPLER)) $(if $(STEPS),--steps $(STEPS)) \
	  $(if $(PRECISION),--precision $(PRECISION)) $(if $(GUIDANCE),--guidance $(GUIDANCE)) $(if $(IMAGES),--images $(IMAGES)) \
	  $(if $(JUMPS),--repaint-jumps $(JUMPS)) $(if $(RESAMPLE),--resample $(RESAMPLE))

train-node: install ## one node of a multi-node training (train.num_nodes > 1): make train-node NODE_RANK=1 MASTER_ADDR=host0 [MASTER_PORT=29500]
	$(if $(filter 0,$(NODE_RANK)),,$(RUN) dvc repro prepare &&) $(RUN) DDPM_NODE_RANK=$(NODE_RANK) DDPM_MASTER_ADDR=$(MASTER_ADDR) \
	  DDPM_MASTER_PORT=$(MASTER_PORT) $(if $(filter 0,$(NODE_RANK)),dvc repro train,python -m pipeline.train)

metrics: install ## show the pipeline's metrics (dvc metrics show)
	$(RUN) dvc metrics show

ui: install ## MLflow UI over the local store (mlflow.db, mlartifacts/) on http://127.0.0.1:5000
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (its Model training view)"
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

plots: install ## render the loss and lr curves to dvc_plots/index.html (dvc plots show)
	$(RUN) dvc plots show

prefect-server: install ## a local Prefect server (API and UI) on http://127.0.0.1:4200
	$(VENV)/bin/prefect server start --host 127.0.0.1

serve: install ## serve the retrain flow on params.yaml's schedule.cron (against $PREFECT_API_URL)
	$(RUN) python -m pipeline.deployments serve

deploy: install ## check prefect.yaml against params.yaml, then deploy it to its work pool (workers clone DDPM_GIT_URL)
	$(RUN) DDPM_GIT_URL="$(DDPM_GIT_URL)" python -m pipeline.deployments check
	$(RUN) DDPM_GIT_URL="$(DDPM_GIT_URL)" DDPM_GIT_BRANCH="$(DDPM_GIT_BRANCH)" prefect --no-prompt deploy --all
	$(RUN) python -m pipeline.deployments zombies

bench: install ## throughput and memory side by side with diffusers (~15 min) -> benchmarks/results.md
	$(PY) -m benchmarks.bench

bench-workers: install ## Prefect workers and nodes: a 4-point grid on 1 vs 2 workers, pick-up time, 2-node training (~8 min) -> benchmarks/workers.md
	$(RUN) python -m benchmarks.workers --out benchmarks/workers.md

bench-team: install ## the team stack's costs: stack start, smoke repro embedded vs team (~6 min) -> benchmarks/team.md
	$(RUN) python -m benchmarks.team --out benchmarks/team.md

bench-conditional: install ## the default's conditioning: conditional vs unconditional, same steps, FID and label accuracy per guidance (~35 min on 2 AVX2 cores) -> benchmarks/conditional.md
	$(RUN) python -m benchmarks.conditional --steps $(or $(STEPS),600) --out benchmarks/conditional.md

bench-ttf: install ## time to quality: classifier FID against training minutes, the default and DDPM recipes (~27 min on 2 cores) -> benchmarks/time_to_fid.md, docs/time_to_fid.png
	$(RUN) python -m benchmarks.time_to_fid --minutes $(or $(MINUTES),8) --every 2

bench-native: install ## which native kernels beat PyTorch's ops on this CPU: train step and sampling chunk per kernel (~6 min) -> benchmarks/native.md
	$(PY) -m benchmarks.native --out benchmarks/native.md

lint: install ## check the code with ruff
	$(PY) -m ruff check src tests pipeline benchmarks
	$(PY) -m ruff format --check src tests pipeline benchmarks

clean: ## remove caches and build leftovers (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

stack-up: $(VENV)/.installed ## start the team stack here (PostgreSQL, S3 object store, MLflow, Prefect); prints its exports
	@$(PY) -m pipeline.stack up --root $(STACK_DIR) $(STACK_ARGS)

stack-down: $(VENV)/.installed ## stop the team stack (its data stays in STACK_DIR, .stack/)
	@$(PY) -m pipeline.stack down --root $(STACK_DIR)

stack-status: $(VENV)/.installed ## which servers of the team stack run and answer
	@$(PY) -m pipeline.stack status --root $(STACK_DIR)

stack-env: $(VENV)/.installed ## print the team stack's client environment (export lines to eval)
	@$(PY) -m pipeline.stack env --root $(STACK_DIR)

push: install ## dvc push data, models, metrics and the run cache to the DVC remote (checked first)
	$(RUN) python -m pipeline.remote push

pull: install ## dvc pull them (remote: .dvc/config.local or DDPM_DVC_REMOTE); then `dvc repro` runs nothing
	$(RUN) python -m pipeline.remote pull
