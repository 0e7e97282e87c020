# OpenMSK Node. Two commands on a fresh machine (as root): `make run` runs the node, `make test` passes the tests.
# Every step prints what it does; a second run installs nothing (stamp files under .venv/).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
APT_PACKAGES := redis-server orthanc orthanc-dicomweb dcmtk dicom3tools
TORCH_PIN := constraints/torch.txt
PY_STAMP := $(VENV)/.installed-python
APT_STAMP := $(VENV)/.installed-apt

.PHONY: run test install install-python install-apt lint format check-python

run: install
	@echo "==> openmsk up"
	$(VENV)/bin/openmsk up

test: install
	@echo "==> pytest"
	$(VPY) -m pytest

install: install-apt install-python

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null \
		|| { echo "error: OpenMSK Node needs Python 3.11 or newer as '$(PYTHON)' (set PYTHON=...)"; exit 1; }

$(VPY): | check-python
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, then the project with the same pin as a constraint: nnunetv2's dependency chain would
# otherwise replace the CPU wheel with a multi-GB CUDA build.
$(PY_STAMP): pyproject.toml $(TORCH_PIN) | $(VPY)
	@echo "==> installing $$(cat $(TORCH_PIN)) into $(VENV)"
	$(PIP) install -q -r $(TORCH_PIN)
	@echo "==> installing openmsk with test extras into $(VENV)"
	$(PIP) install -q -c $(TORCH_PIN) -e '.[test]'
	@touch $@

install-python: $(PY_STAMP)
	@echo "==> Python packages up to date in $(VENV)"

install-apt:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "==> Debian packages present: $(APT_PACKAGES)"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "error: Debian packages missing:$$missing — run as root or install them with apt-get"; exit 1; fi; \
	echo "==> apt-get install$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

lint:
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .
