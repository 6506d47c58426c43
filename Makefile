# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KUBETUNE := $(VENV)/bin/kubetune
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export GPTQMODEL_CPU_WORKERS ?= 2
export GPTQMODEL_DISABLE_PACK_EXT ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help venv demo test test-slow lint clean

help:  ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ui,demo]'
	touch $@

venv: $(STAMP)  ## Create .venv and install kubetune with its pinned dependencies

test: $(STAMP)  ## Run the test suite (excludes tests marked slow)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)  ## Run only the slow tests
	$(PY) -m pytest -m slow -q

lint: $(STAMP)  ## Validate every shipped recipe
	$(KUBETUNE) validate jobs/*.yaml

clean:  ## Remove local artifacts (keeps the venv and the model cache)
	rm -rf artifacts
