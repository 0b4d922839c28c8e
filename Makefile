# The two commands of a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench clean install-agent uninstall-agent

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/iotauth demo

# -n 2: the suite is mostly subprocesses and handshakes; two workers fit a 2-core machine.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# On a Raspberry Pi (root): user, directories, systemd unit; CREDS is a credential directory.
install-agent:
	IOTAUTH_SOURCE=$(CURDIR) packaging/install-agent.sh install $(CREDS)

uninstall-agent:
	packaging/install-agent.sh uninstall

