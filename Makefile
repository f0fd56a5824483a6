# edge-relay developer and CI entry points (GNU make). `make help` lists them.
#
# Every target that needs tools runs scripts/bootstrap first: it installs
# whatever is missing (Debian packages when root, the test virtualenvs) and
# says so, and is silent when everything is already there.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
VENV_PATH := .venv-path
PYTHON    := $(VENV)/bin/python

# Extra pytest arguments, e.g.  make test PYTEST_ARGS='-k stun -x'
PYTEST_ARGS ?=

# The second run, on the python3 first on PATH, only checks that the code
# works on that interpreter too: no root or slow tests, quiet (only failures
# summarized), no cache writes.
PATH_PYTEST_ARGS := -q -rfE -p no:cacheprovider -m 'not root and not slow'

# What `make clean` removes. Targets added below may append to it (CLEAN += ...).
CLEAN := $(VENV) $(VENV_PATH) .pytest_cache build dist *.egg-info

# make lint: Debian's pyflakes, pycodestyle and isort (settings in
# pyproject.toml and setup.cfg), run on Debian's python3, whose packages
# they are; the virtualenvs hold only the test dependencies.
LINT_PYTHON := /usr/bin/python3
LINT_PATHS  := edge_relay tests bench

.PHONY: help bootstrap lint test check clean

help: ## list the targets
	@echo "Targets:"
	@awk -F ':.*## ' '/^[A-Za-z0-9_.-]+:.*## / { printf "  %-10s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

bootstrap: ## install what the tests need (Debian packages as root, .venv)
	scripts/bootstrap

lint: bootstrap ## pyflakes, pycodestyle, isort --check on edge_relay/ tests/ bench/ (line length 120)
	$(LINT_PYTHON) -m pyflakes $(LINT_PATHS)
	$(LINT_PYTHON) -m pycodestyle $(LINT_PATHS)
	$(LINT_PYTHON) -m isort --check-only --diff --quiet $(LINT_PATHS)

# E2E=0 leaves out the booted-container install test (make e2e, about 2 min, root only).
E2E ?= 1

test: bootstrap lint ## the whole suite: make lint, pytest, the install test in a booted container (root), PATH's python3
	$(PYTHON) -m pytest $(PYTEST_ARGS)
	@if [ "$(E2E)" != 1 ]; then echo "make test: E2E=0, not running make e2e"; \
	elif [ "$$(id -u)" != 0 ]; then echo "make test: not root, skipping make e2e (the booted-container install test)"; \
	else $(MAKE) --no-print-directory e2e; fi
	@if [ -x $(VENV_PATH)/bin/python ]; then \
		echo "$(VENV_PATH)/bin/python -m pytest $(PATH_PYTEST_ARGS) $(PYTEST_ARGS)  # python3 on PATH"; \
		$(VENV_PATH)/bin/python -m pytest $(PATH_PYTEST_ARGS) $(PYTEST_ARGS); \
	fi

check: test ## same as test

clean: ## remove the virtualenvs, caches and build output
	rm -rf $(CLEAN)
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +

# --- Targets owned by other parts of the project ---------------------------
# demo, deb, bench, e2e and the like go below this line. For each: add it to
# .PHONY, give it a `## description` so that `make help` lists it, run
# `scripts/bootstrap --apt PKG...` first if it needs Debian packages, and
# append what it builds to CLEAN.

# --- demo ---------------------------------------------------------------------
# The relay, the demo transceiver and synthetic voice callers on loopback, on
# Debian's python3 (what the package runs on); the runtime needs nothing else.
DURATION ?=
CLIENTS  ?= 4
.PHONY: demo
demo: ## relay + demo transceiver + voice callers on loopback, live status (DURATION=s, CLIENTS=n)
	scripts/bootstrap
	/usr/bin/python3 -m edge_relay demo --clients $(CLIENTS) $(if $(DURATION),--duration $(DURATION))

# Targets of the packaging, bench and hardening work live in mk/*.mk.
-include mk/*.mk
