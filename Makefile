# tumorscope: `make help` lists the targets. Everything runs in the uv-locked environment.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv: use the one on PATH, else bootstrap it into .tools/ from PyPI (no other network needed).
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
RUN := $(UV) run --frozen
export TF_CPP_MIN_LOG_LEVEL ?= 2
# TensorFlow leaves its oneDNN kernels off on CPUs it does not recognise (AMD EPYC: half the speed); src/tumorscope/runtime.py
export TF_ENABLE_ONEDNN_OPTS ?= 1
export KERAS_BACKEND ?= tensorflow
export GX_ANALYTICS_ENABLED ?= false
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= 1
# Prefect keeps its local (ephemeral) API database in the project, not in ~/.prefect.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export BENTOML_DO_NOT_TRACK ?= true

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv

# dvc metrics show --json -> a two-column Markdown table (the wide `--md` one has a column per metric).
define METRICS_TABLE
import json, sys
def rows(prefix, value):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from rows(f"{prefix}.{key}" if prefix else key, inner)
    else:
        yield prefix, f"{value:.4g}" if isinstance(value, float) else str(value)
print("| file | metric | value |"); print("|---|---|---|")
for path, entry in json.load(sys.stdin)[""]["data"].items():
    for name, value in rows("", entry["data"]):
        print(f"| {path} | {name} | {value} |")
endef
export METRICS_TABLE

.PHONY: help install run test lint dvc-yaml test-fast test-deps bench metrics-table crossval gpu-wheels mlflow-ui mlflow-server clean clean-stores prefect-server deploy worker serve bento serving-lock demo monitor evidently-ui
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(UV) .venv/.bytecode ## install the locked environment (.venv) with uv
	$(UV) sync --frozen

# Machines that set PYTHONDONTWRITEBYTECODE (CI runners do) never cache compiled modules, so every
# process would compile TensorFlow's, MLflow's and DVC's sources again: ~10 s more per pipeline stage
# and per test subprocess. Compile them once per lock file instead (~90 s).
.venv/.bytecode: uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

run: install ## install, then run the whole pipeline (dvc repro) on the embedded phantom
	$(RUN) dvc repro
	$(RUN) dvc metrics show

# Two pytest-xdist workers keep both of CI's cores busy (one process at a time left one idle about
# half the time); tests that share a session server or project run on one worker (xdist_group).
PYTEST_WORKERS ?= 2
test: install lint ## lint and type-check, then run the test suite (unit, integration, model; slow tests at a small size)
	$(RUN) pytest -n $(PYTEST_WORKERS) --dist loadgroup

lint: install ## ruff (style, imports, bug patterns) and mypy (types) on the code
	$(RUN) ruff check src flows serving tests benchmarks
	$(RUN) mypy

dvc-yaml: install ## render dvc.yaml from src/tumorscope/stages/graph.py (after a stage's params, outs or imports change)
	$(RUN) tumorscope dvc-yaml

test-fast: install ## the unit tier: tests/unit without the slow tests (about a minute)
	$(RUN) pytest tests/unit -m "not slow"

# The tests' one need beyond the locked Python environment: a browser for the page tests (Debian's
# chromium and its driver). Installed where we can (root with apt-get); otherwise said, and those
# tests skip in a user's clone (under CI=true they fail instead).
test-deps: ## install what the tests need beyond Python: Debian's chromium + chromium-driver (as root)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "test-deps: chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null && \
	  echo "test-deps: installed chromium and chromium-driver"; \
	else echo "test-deps: run 'sudo apt-get install chromium chromium-driver' for the page tests (they skip without it)"; fi

bench: install ## run the benchmarks in benchmarks/ and print measured ratios
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(RUN) python $$script || exit 1; done

metrics-table: install ## the metrics of `dvc metrics show`, one row per metric (the README's table)
	@$(RUN) dvc metrics show --json | $(RUN) python -c "$$METRICS_TABLE"

crossval: install ## grouped k-fold cross-validation of train.* on the cache (after make run; params: crossval.*)
	$(RUN) tumorscope crossval

# What an offline GPU host with JAX but no TensorFlow and no package index (Python 3.12) lacks to run the
# model code and benchmarks/bench_architectures.py: versions as in uv.lock. docs/architectures.md, "On a GPU".
GPU_WHEELS := keras==3.15.1 namex==0.1.0 optree==0.20.0 pydantic==2.14.3 pydantic-core==2.50.4 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
gpu-wheels: ## download the wheels an offline JAX GPU host lacks into .whl/ (copy it there with the project)
	rm -rf .whl && python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

prefect-server: install ## a local Prefect server and UI (http://127.0.0.1:4200); then: export PREFECT_API_URL=http://127.0.0.1:4200/api
	$(RUN) prefect server start --host 127.0.0.1

deploy: install ## register the training (dvc exp run) and hourly drift-monitoring deployments on the tumorscope work pool
	$(RUN) python -m flows.deploy

worker: install ## a Prefect worker that runs the deployment's flow runs in this folder
	$(RUN) prefect worker start --pool tumorscope

serve: install ## serve the champion with BentoML on http://127.0.0.1:3000 (the clinician page: /ui/)
	$(RUN) bentoml serve serving.service:TumorScope --host 127.0.0.1 --port 3000

serving-lock: $(UV) ## export the Bento's requirements (pyproject's serving group) from uv.lock to serving/requirements.txt
	$(UV) export --frozen --only-group serving --no-hashes --no-emit-project -o serving/requirements.txt

# bentoml build runs uv: the one make uses, on PATH or bootstrapped into .tools/bin.
bento: install ## build a Bento with the champion inside, tagged model<N>-data<fingerprint>-code<commit>
	PATH="$(dir $(UV)):$$PATH" $(RUN) tumorscope bento

monitor: install ## drift of new slices or the inference log against the champion (CURRENT=folder|log.jsonl, default monitor.current)
	$(RUN) tumorscope monitor $(if $(CURRENT),--current $(CURRENT))

evidently-ui: install ## the Evidently UI on the drift history (http://127.0.0.1:8000)
	$(RUN) evidently ui --workspace monitoring/workspace --host 127.0.0.1 --port 8000

demo: install ## dvc repro, then serve -> requests -> another scanner -> drift -> readings of queued answers -> harvest -> retraining -> gates
	$(RUN) dvc repro
	PATH="$(dir $(UV)):$$PATH" $(RUN) python -m flows.demo

mlflow-ui: install ## open the MLflow UI on the local tracking store (http://127.0.0.1:5000)
	$(RUN) mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

mlflow-server: install ## a shared MLflow tracking server (mlflow.server.* in params.yaml; clients: mlflow.tracking_uri: http://<host>:<port>)
	$(RUN) tumorscope mlflow-server

clean: install ## remove the pipeline's outputs (never data.source, the DVC cache or remote)
	$(RUN) tumorscope clean

clean-stores: install ## clean, and also the local MLflow, Optuna and Prefect stores (all together)
	$(RUN) tumorscope clean --stores
