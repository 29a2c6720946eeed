# Two entry points on a fresh machine: `make demo` and `make test` (CI: .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-packages demo test test-all bench clean perf-analyzer

# Debian programs the tests and the demo start for real: redis-server (the online feature store),
# prometheus + promtool (the alert rules, checked and fired on a real Prometheus), chromium (the
# Evidently UI rendered headless), prometheus-pushgateway (the monitor job's gauges pushed), libhiredis-dev
# (treeops' C backend reads the online store with hiredis).
SYSTEM_PACKAGES := redis-server prometheus chromium prometheus-pushgateway libhiredis-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Checked on every run, not only when the venv is built: a package added later reaches existing checkouts.
system-packages:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); }

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: system-packages $(STAMP)

demo: install
	$(BIN)/treeops demo

# CI's command (.ci/run): every test but the long scenarios (marker `long`), with the slowest listed.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not long" --durations=25

test-all: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=25

# NVIDIA perf_analyzer, the second load generator of `treeops bench serving`: tritonclient 2.41.0's wheel
# ships the binary, with libcudart.so.12 from nvidia-cuda-runtime-cu12 (no GPU is used) and Debian's
# libb64-0d. Its own folder: the venv's tritonclient is pinned to another version (constraints.txt).
PERF_ANALYZER_DIR := $(VENV)/perf_analyzer
PERF_ANALYZER_WHEELS := tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79

$(PERF_ANALYZER_DIR)/bin/perf_analyzer: | $(STAMP)
	dpkg -s libb64-0d >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libb64-0d; }
	$(BIN)/python -m pip install -q --no-deps --target $(PERF_ANALYZER_DIR) $(PERF_ANALYZER_WHEELS)

perf-analyzer: $(PERF_ANALYZER_DIR)/bin/perf_analyzer

clean:
	rm -rf $(VENV) data reports mlflow.db mlartifacts .triton model_repository/*/
