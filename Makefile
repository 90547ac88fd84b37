# tfstack: set up, test and run on a fresh Debian machine with Python >= 3.11.
#
#   make venv    .venv/ with tfstack and its dev tools (reinstalled when pyproject.toml changes)
#   make test    set up, write the demo data if missing, run pytest (PYTEST_ARGS="-k data -x")
#   make run     set up, write the demo data if missing, run the DVC pipeline (dvc repro)
#   make params  rewrite params.yaml from conf/ (as DVC composes it)
#   make lint    ruff check + ruff format --check
#   make bench   benchmarks/bench.py: tfstack vs plain Keras, ratios measured side by side (~6 min)
#   make ui      MLflow UI on http://127.0.0.1:5000 for the runs in ./mlflow.db
#   make clean   caches and scratch outputs (keeps .venv, data/, mlflow.db, the DVC cache)
#   make distclean  clean, and remove .venv too

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
# chromium-driver: tests/test_ui.py loads the MLflow UI in a real browser).
DEB_PACKAGES ?= git postgresql chromium chromium-driver
RAW_DATA := data/digits.npz
PYTEST_ARGS ?=

export TF_CPP_MIN_LOG_LEVEL ?= 2
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv deb data test run params lint format ui clean distclean bench
.DELETE_ON_ERROR:

venv: $(VENV_STAMP)

# Installs the missing ones of $(DEB_PACKAGES); without root it only says what is missing.
deb:
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

$(VENV_STAMP): pyproject.toml | deb
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
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo's raw data, written only when missing; `dvc commit` then fills the (fresh) DVC cache
# and fails if the bytes differ from what data.dvc recorded (its stdout is not a terminal, so it
# refuses instead of asking). On failure .DELETE_ON_ERROR removes the file, so the next run
# checks again.
$(RAW_DATA): | $(VENV_STAMP)
	$(BIN)/python -m tfstack.demo write-raw data
	@if [ -f data.dvc ]; then \
	  $(BIN)/dvc commit data.dvc </dev/null >/dev/null \
	    || { echo "error: the regenerated data/ differs from data.dvc (see above)" >&2; exit 1; }; \
	fi

data: $(RAW_DATA)

# With .venv/bin first on PATH, as if activated: the stages' `tfstack ...` commands need it.
ACTIVATE := PATH="$(CURDIR)/$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"

test: $(VENV_STAMP) $(RAW_DATA)
	$(ACTIVATE) $(BIN)/python -m pytest $(PYTEST_ARGS)

run: $(VENV_STAMP) $(RAW_DATA)
	$(ACTIVATE) $(BIN)/dvc repro

# After editing conf/: rewrite the committed params.yaml (what plain `dvc repro` reads).
params: $(VENV_STAMP)
	$(BIN)/tfstack params

# Prints the README's performance table; no timed assertions.
bench: $(VENV_STAMP) $(RAW_DATA)
	$(ACTIVATE) $(BIN)/python benchmarks/bench.py

lint: $(VENV_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV_STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

ui: $(VENV_STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache outputs multirun

distclean: clean
	rm -rf $(VENV)
