# The commands the README names. `make run` and `make test` create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Embedded, server-free defaults: Prefect's ephemeral API and state live under the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run repro test lint clean serve stop status

install: $(STAMP)

# Reinstalls only when the project's dependencies or the lock change.
$(STAMP): pyproject.toml constraints.txt scripts/provision_weights.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,pipeline,services,dev]'
	$(BIN)/python scripts/provision_weights.py
	touch $(STAMP)

# Ends with the gated promotion: the model becomes `champion` only if it passes the gates
# (params.yaml `promote:`, including the absolute floor min_mean_r1).
run: install
	$(BIN)/xmodal run --promote

repro: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Real services on 127.0.0.1 (Prefect server + work pool + deployments + worker, MLflow server).
# Ports: XMODAL_PREFECT_PORT (4200), XMODAL_MLFLOW_PORT (5000); XMODAL_BACKEND=postgres puts both
# backend stores in a PostgreSQL cluster (XMODAL_POSTGRES_PORT, 5432). State: .services/.
serve: install
	$(BIN)/xmodal services start

stop:
	$(BIN)/xmodal services stop

status:
	$(BIN)/xmodal services status

clean:
	rm -rf $(PREFECT_HOME) mlflow.db mlartifacts outputs reports data/raw data/prepared models
