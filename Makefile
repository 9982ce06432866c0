# infergate's two commands:
#   make demo   set everything up, build the demo models locally, serve them on 127.0.0.1:8001
#               (Prometheus metrics on http://127.0.0.1:8002/metrics)
#   make test   set everything up (tools included) and run lint, type checks and the whole test suite
#   make image-test  build the CPU and CUDA images with buildah and smoke-test them (root; minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_REPOSITORY ?= demo-models
HOST ?= 127.0.0.1
PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: demo test lint protos tools bench peers image-test clean

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("infergate needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e clients/python
	touch $@

demo: $(BIN)/.installed
	$(BIN)/infergate demo-repository $(DEMO_REPOSITORY)
	$(BIN)/infergate serve --model-repository $(DEMO_REPOSITORY) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

tools: $(BIN)/.installed
	scripts/install_perf_analyzer.sh
	scripts/install_promtool.sh
	scripts/install_helm.sh
	scripts/build_node_client.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check server tests load_tests scripts clients/python
	$(BIN)/mypy

# The suite in two processes (a test file stays in one), then the tests marked `alone`, which compare
# latencies under load, with the machine to themselves.
test: tools lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not alone"
	$(BIN)/python -m pytest -m alone

# Not part of `make test`: building both images takes minutes (docs/deploy.md has the costs).
image-test: $(BIN)/.installed
	scripts/build_image.sh
	VARIANT=cuda scripts/build_image.sh

protos: $(BIN)/.installed
	$(BIN)/python scripts/gen_protos.py

bench: $(BIN)/.installed
	$(BIN)/python -m load_tests suite --out results/latest

# Peer servers for `python -m load_tests suite --peers` (Triton, KServe, MLServer), each in its own
# environment under .tools/peers/. Not part of `test`: together they are over a gigabyte.
peers:
	scripts/install_peers.sh

clean:
	rm -rf $(VENV) $(DEMO_REPOSITORY) .tools results .pytest_cache .mypy_cache .ruff_cache
