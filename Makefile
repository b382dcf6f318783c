# Developer entry points: setup, run, test, lint, fmt, bench, clean.
#
#   make setup        .venv with the package (editable) and the test tools
#   make run ARGS=... start the server (127.0.0.1:2525, data in ./ehlo-data, the web UI
#                     on http://127.0.0.1:8025/: its URL is logged at start);
#                     on a fresh clone it installs the runtime dependencies only
#   make test         ruff, mypy, lint-imports and pytest (PYTEST_ARGS=... passed to pytest)
#   make test-deps    the Debian packages the tests drive (swaks, openssl, postfix tools, haproxy)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact versions of every dependency (pyproject.toml has the ranges).
CONSTRAINTS := requirements/constraints.txt
# Record where the venv was installed for; a venv copied or cloned from
# elsewhere (its scripts point at another path) is rebuilt. RUN_STAMP: the
# package and its runtime dependencies; STAMP: those and the test tools.
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
ARGS ?=
PYTEST_ARGS ?=

ifneq ($(shell cat $(STAMP) 2>/dev/null),$(CURDIR))
.PHONY: $(STAMP)
endif
ifneq ($(shell cat $(RUN_STAMP) 2>/dev/null),$(CURDIR))
.PHONY: $(RUN_STAMP)
endif

# The venv, made with $(PYTHON) unless a working one (Python 3.11+) is there.
# pyproject.toml's requires-python is checked first, in one line: pip would
# report the first dependency without a release for the old Python instead.
define make_venv
	@if ! { [ -x $(BIN)/python ] && $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	        && head -n1 $(BIN)/pip 2>/dev/null | grep -qx '#!$(CURDIR)/$(BIN)/python[0-9.]*'; }; then \
	    if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	        echo "make: ehlo needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo "not found") (try: make PYTHON=python3.11 $(or $(MAKECMDGOALS),setup))" >&2; \
	        exit 1; \
	    fi; \
	    echo "creating $(VENV) with $$($(PYTHON) --version)"; \
	    rm -rf $(VENV); \
	    $(PYTHON) -m venv $(VENV); \
	fi
endef

.PHONY: help setup run test test-deps lint fmt bench bench-relay fuzz clean distclean

help:
	@echo "targets: setup run test test-deps lint fmt bench bench-relay fuzz clean distclean"
	@echo "  make run ARGS='--listen 127.0.0.1:2526'   make test PYTEST_ARGS='-k tls -x'"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(make_venv)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[test,postgresql]'
	@echo '$(CURDIR)' > $(RUN_STAMP)
	@echo '$(CURDIR)' > $@

# Runtime dependencies only: the venv of a server, without the test tools.
$(RUN_STAMP): pyproject.toml $(CONSTRAINTS)
	$(make_venv)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[postgresql]'
	@echo '$(CURDIR)' > $@

run: $(RUN_STAMP)
	$(BIN)/ehlo serve $(ARGS)

test-deps:
	@bash scripts/install-test-deps.sh

# pytest exits 5 when it collected no test: that fails `make test`, loudly.
test: setup test-deps
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	@rc=0; PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test (exit 5)" >&2; fi; \
	exit $$rc

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: setup
	$(BIN)/ruff format src tests

# QUICK=1: about 10x fewer messages (under 2 minutes); BENCH_ARGS=... goes to bench/run.py,
# MESSAGES_ARGS=... to bench/messages.py (`ehlo messages` on a store of 100,000 messages),
# RELAY_ARGS=... to bench/relay.py (R1 relaying against Postfix, R2 a queue at rest),
# which `make bench-relay` runs alone, WEB_ARGS=... to bench/web.py (the HTTP API on
# 100,000 messages: a page, a search, wait), PG_BODIES_ARGS=... to bench/pg_bodies.py
# (bodies as chunk rows or large objects) and PG_DRIVER_ARGS=... to bench/pg_driver.py
# (psycopg against asyncpg), both on a throwaway PostgreSQL.
MESSAGES_ARGS ?=
RELAY_ARGS ?=
WEB_ARGS ?=
PG_BODIES_ARGS ?=
PG_DRIVER_ARGS ?=
bench: setup
	bash bench/setup.sh
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)
	$(BIN)/python bench/messages.py $(if $(QUICK),--quick) $(MESSAGES_ARGS)
	$(BIN)/python bench/web.py $(if $(QUICK),--quick) $(WEB_ARGS)
	$(BIN)/python bench/pg_bodies.py $(if $(QUICK),--quick) $(PG_BODIES_ARGS)
	$(BIN)/python bench/pg_driver.py $(if $(QUICK),--quick) $(PG_DRIVER_ARGS)
	$(BIN)/python bench/relay.py $(if $(QUICK),--quick) $(RELAY_ARGS)

bench-relay: setup
	$(BIN)/python bench/relay.py $(if $(QUICK),--quick) $(RELAY_ARGS)

# Long fuzzing run of the protocol core (a few minutes); failing inputs are saved
# as tests/fuzz/corpus/<target>/crash-*.bin. FUZZ_ARGS='--target server --seconds 600'.
FUZZ_ARGS ?=
fuzz: setup
	$(BIN)/python scripts/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis \
	    src/*.egg-info
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the venv (not ehlo-data: that holds mail).
distclean: clean
	rm -rf $(VENV)
