# Two entry points for a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Run the local fleet (Redis, Envoy, controller, collector, 2 pickers, 4 simulated pods) until Ctrl-C.
## FLEET_ARGS passes more flags, e.g. FLEET_ARGS="--port-base 40000 --manifests other/".
up: $(STAMP)
	$(BIN)/local-fleet --manifests examples/fleet $(FLEET_ARGS)

## Run the test suite against real Redis, Envoy and simulated pods.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## Routing quality against round robin, random, least-queue, sglang-router and vllm-router (quick profile).
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.routing $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
