# medfed — the two commands of the README do all their own set-up.
#   make demo   synthetic hospitals → local de-identification → DP federated training
#   make test   the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages medfed's features need (installed when make runs as root).
SYSTEM_PACKAGES := tesseract-ocr tesseract-ocr-eng dicom3tools dcmtk orthanc chromium nginx
# Flower must not phone home or install packages at run time (docs/design.md invariant 6).
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint system-deps install clean

demo: $(STAMP)
	$(BIN)/medfed demo --out demo-out

test: lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

install: $(STAMP)

system-deps:
	@if [ -n "$(strip $(SYSTEM_PACKAGES))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else \
	    echo "medfed: not root; make sure these Debian packages are installed: $(SYSTEM_PACKAGES)"; \
	  fi; \
	fi

# torch first, as exactly torch==2.13.0 (the CPU build here, the CUDA build on a
# GPU host), then the project with its pinned dependencies.
$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
