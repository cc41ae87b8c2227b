# softswitch — the two commands of CONTRACT.md and their helpers.
#
#   make run     create .venv, install the package, run `softswitch serve` (CONFIG=file.toml optional)
#   make test    install what the tests need, then lint, type-check and run the whole suite
#   make lint    ruff + mypy          make unit   unit tests only          make clean   remove build state

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
VENV_PY     := $(VENV)/bin/python
# Stamps: re-install only when pyproject.toml changes, so re-runs start at once.
STAMP       := $(VENV)/.stamp
TEST_STAMP  := $(VENV)/.test-stamp
# Python 3.11 or newer; on Debian bookworm that is plain python3.
PYTHON      ?= $(shell command -v python3.11 || command -v python3)
CONFIG      ?=
PYTEST_ARGS ?=

# Real peers the integration tests drive (TESTING.md), and the Debian packages that provide them.
SYSTEM_TOOLS    := sipp baresip mosquitto mosquitto_sub sox
SYSTEM_PACKAGES := sip-tester baresip-core mosquitto mosquitto-clients sox

.PHONY: help run test lint format unit integration system-deps install clean

help:
	@echo "make run    - set up .venv and start softswitch (demo config; CONFIG=file.toml for yours)"
	@echo "make test   - install test dependencies, then ruff, mypy and the whole pytest suite"
	@echo "make lint   - ruff check and mypy      make format - ruff format"
	@echo "make unit   - unit tests only          make integration - integration tests only"
	@echo "make clean  - remove .venv and caches (keeps ./data)"

$(VENV_PY):
	@if [ -z "$(PYTHON)" ]; then echo "Python 3.11+ is required (python3.11 or python3 on PATH)" >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "Python 3.11+ is required; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "python venv support is missing: installing python3-venv"; \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
				&& $(PYTHON) -m venv $(VENV); \
		else \
			echo "cannot create $(VENV): install python3-venv (Debian/Ubuntu) and retry" >&2; exit 1; \
		fi; }

$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(VENV_PY) -m pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

run: $(STAMP) media-engine
	$(VENV)/bin/softswitch serve $(if $(CONFIG),--config $(CONFIG))

# The peers come from Debian; installed only when missing and only as root (CI containers run as root).
system-deps:
	@missing=""; \
	for tool in $(SYSTEM_TOOLS); do \
		command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || [ -x /usr/bin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing test peers (missing:$$missing)"; \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
		else \
			echo "WARNING: missing$$missing; install as root: apt-get install $(SYSTEM_PACKAGES)" >&2; \
		fi; \
	fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check softswitch tests
	$(VENV)/bin/mypy

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format softswitch tests

unit: $(TEST_STAMP)
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

integration: $(TEST_STAMP) system-deps media-engine
	$(VENV)/bin/pytest -q tests/integration $(PYTEST_ARGS)

test: $(TEST_STAMP) system-deps media-engine lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

include mk/media-engine.mk

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
