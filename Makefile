# The commands the README names. `make run` and `make test` create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Embedded, server-free defaults: Prefect's ephemeral API and state live under the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run repro test lint clean

install: $(STAMP)

# Reinstalls only when the project's dependencies or the lock change.
$(STAMP): pyproject.toml constraints.txt scripts/provision_weights.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python scripts/provision_weights.py
	touch $(STAMP)

run: install
	$(BIN)/xmodal run

repro: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(PREFECT_HOME) mlflow.db mlartifacts outputs reports data/raw data/prepared models
