# The two commands of the README contract: `make repro` and `make test`.
# Each creates .venv and installs the pinned dependencies by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data preset repro test lint ui mlflow-ui prefect-ui serve clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

data: setup
	genpipe data ensure

# Switch params.yaml to a preset: make preset NAME=mnist (README: Presets)
preset: setup
	genpipe preset $(NAME)

repro: data
	python -m flows.pipeline

# Two xdist workers, whole files as units, in the order given: the pipeline modules
# (minutes each, one repo per module) start first; the rest fill in after.
SLOW_TESTS := tests/test_ops.py tests/test_pipeline_e2e.py tests/test_workpool.py \
	tests/test_tracking_server.py tests/test_remotes.py

test: setup
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(SLOW_TESTS) tests

lint: setup
	ruff check src flows tests bench && ruff format --check src flows tests bench

ui: setup
	@echo "MLflow UI on http://127.0.0.1:5000 and Prefect UI on http://127.0.0.1:4200 (Ctrl-C stops both)"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 & \
	prefect server start --host 127.0.0.1 --port 4200; kill %1

serve: setup
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} python -m flows.deploy

clean:
	rm -rf data/prepared metrics plots reports checkpoints mlartifacts mlflow.db .dvc/tmp
