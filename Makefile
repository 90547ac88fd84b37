# tfstack: set up, test and run on a fresh Debian machine with Python >= 3.11.
# `make help` lists the targets (from the `## ` comments below).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; older than pyproject.toml means "reinstall".
VENV_STAMP := $(VENV)/.tfstack-installed
# Debian packages the project needs, installed when missing and running as root (postgresql:
# tests/test_team_tracking.py starts a real PostgreSQL server for `mlflow server`; chromium and
# chromium-driver: tests/test_ui.py loads the MLflow UI in a real browser; graphviz: the
# architecture diagrams every run logs, tfstack.diagrams).
DEB_PACKAGES ?= git postgresql chromium chromium-driver graphviz
RAW_DATA := data/digits
PYTEST_ARGS ?=

export TF_CPP_MIN_LOG_LEVEL ?= 2
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv deb data test test-fast run params lint format lock ui clean distclean bench
.DELETE_ON_ERROR:

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 18

venv: $(VENV_STAMP) ## .venv/ with tfstack and its tools, exact versions of requirements.lock

# Installs the missing ones of $(DEB_PACKAGES); without root it only says what is missing.
deb: ## the Debian packages tests need (as root; otherwise says which are missing)
	@if ! command -v dpkg-query >/dev/null; then \
	  echo "warning: not a Debian system; make sure these are installed: $(DEB_PACKAGES)" >&2; exit 0; \
	fi; \
	missing=""; \
	for package in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$package" 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	  else \
	    echo "warning: missing Debian packages:$$missing (not root; install them with: sudo apt-get install$$missing)" >&2; \
	  fi; \
	fi

$(VENV_STAMP): pyproject.toml requirements.lock | deb
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import sys; print(sys.version.split()[0])'); tfstack needs >= 3.11. Use make PYTHON=python3.11" >&2; exit 1; }
	@# Debian's python3 has no venv/ensurepip until python3-venv is installed.
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; \
	  else \
	    echo "error: $(PYTHON) cannot create a venv; install python3-venv" >&2; exit 1; \
	  fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# The demo's raw data (PNGs in class folders data/digits/0..9/), written only when missing;
# `dvc commit` then fills the (fresh) DVC cache and fails if the bytes differ from what data.dvc
# recorded (its stdout is not a terminal, so it refuses instead of asking). On failure the folder
# is removed (.DELETE_ON_ERROR removes files only), so the next run checks again.
$(RAW_DATA): | $(VENV_STAMP)
	$(BIN)/python -m tfstack.pipeline.demo write-raw data
	@if [ -f data.dvc ]; then \
	  $(BIN)/dvc commit data.dvc </dev/null >/dev/null \
	    || { rm -rf $@; echo "error: the regenerated data/ differs from data.dvc (see above)" >&2; exit 1; }; \
	fi

data: $(RAW_DATA) ## the demo's raw data (data/digits/<digit>/*.png), when missing

# With .venv/bin first on PATH, as if activated: the stages' `tfstack ...` commands need it.
ACTIVATE := PATH="$(CURDIR)/$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"

test: $(VENV_STAMP) $(RAW_DATA) ## the whole suite, as CI runs it (PYTEST_ARGS="-k data -x")
	$(ACTIVATE) $(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: $(VENV_STAMP) $(RAW_DATA) ## unit tests only (not the slow end-to-end ones)
	$(ACTIVATE) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# `evaluate` as the target: the demo's stages run only as upstream of the configured files.
run: $(VENV_STAMP) $(RAW_DATA) ## the DVC pipeline: dvc repro evaluate
	$(ACTIVATE) $(BIN)/dvc repro evaluate

# After editing conf/: rewrite the committed params.yaml (what plain `dvc repro` reads).
params: $(VENV_STAMP) ## rewrite params.yaml from conf/ (as DVC composes it)
	$(BIN)/tfstack params

# Prints the README's performance table; no timed assertions.
bench: $(VENV_STAMP) $(RAW_DATA) ## benchmarks/bench.py: tfstack vs plain Keras, ratios (~6 min)
	$(ACTIVATE) $(BIN)/python benchmarks/bench.py

lint: $(VENV_STAMP) ## ruff check + ruff format --check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV_STAMP) ## ruff fix + format
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Re-resolves requirements.lock from pyproject.toml, keeping the locked versions where they still
# fit (LOCK_ARGS=--upgrade for the newest). uv resolves in seconds; it is not a dependency.
lock: $(VENV_STAMP) ## re-resolve requirements.lock after editing pyproject.toml
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --no-header \
	  --annotation-style line --quiet $(LOCK_ARGS) -o requirements.lock
	sed -i '1i # Exact versions that `make` installs (CI and `make run` alike), resolved from pyproject.toml\n# with all extras for Python 3.11 on Linux. Re-resolve after changing pyproject.toml: make lock' requirements.lock

ui: $(VENV_STAMP) ## MLflow UI on http://127.0.0.1:5000 for the runs in ./mlflow.db
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1

clean: ## caches and scratch outputs (keeps .venv, data/, mlflow.db, the DVC cache)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache outputs multirun

distclean: clean ## clean, and remove .venv too
	rm -rf $(VENV)
