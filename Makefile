# Every target does its own set-up on a fresh Debian 12 machine (as root): Debian packages when missing,
# a venv in .venv, the project installed editable with its test extras.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
DEB_PACKAGES := etcd-server etcd-client iproute2
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all deps venv test unit lint lab bench clean

all: test

deps:
	@scripts/ensure-debs $(DEB_PACKAGES)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

# pytest exits 5 when it collected nothing: a suite that runs nothing must not pass.
test: deps venv
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (check testpaths)" >&2; exit 1; fi; \
	  exit $$rc

unit: venv
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

lab: deps venv
	@echo "make lab: not yet — the namespace lab runner lands with issue 3 (containerlab/)."

bench: deps venv
	$(VENV)/bin/python bench/ipam_rate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
