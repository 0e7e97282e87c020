# OpenMSK Node. Two commands on a fresh machine (as root): `make run` runs the node, `make test` passes the tests.
# Every step prints what it does; a second run installs nothing (stamp files under .venv/).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
APT_PACKAGES := redis-server orthanc orthanc-dicomweb dcmtk dicom3tools docker-compose chromium openssl
TORCH_PIN := constraints/torch.txt
PY_STAMP := $(VENV)/.installed-python
APT_STAMP := $(VENV)/.installed-apt

.PHONY: run test install install-python install-apt install-viewer lint format check-python

run: install
	@echo "==> openmsk up"
	$(VENV)/bin/openmsk up

test: install
	@echo "==> pytest"
	$(VPY) -m pytest

VIEWER_STAMP := node_modules/@ohif/app/dist/index.html

install: install-apt install-python install-viewer

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
	@echo "==> installing openmsk with its worker and test extras into $(VENV)"
	$(PIP) install -q -c $(TORCH_PIN) -e '.[worker,test]'
	@touch $@

install-python: $(PY_STAMP)
	@echo "==> Python packages up to date in $(VENV)"

# The OHIF viewer's prebuilt dist/ from npm (never committed). The lock file names only @ohif/app: its dist
# needs none of the package's build-time dependencies, so `npm install` must not be used here.
$(VIEWER_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is missing (Debian package npm) — needed for the OHIF viewer"; exit 1; }
	@echo "==> npm ci (OHIF viewer build into node_modules/)"
	npm ci --omit=dev --ignore-scripts --no-audit --no-fund
	@touch $@

install-viewer: $(VIEWER_STAMP)
	@echo "==> OHIF viewer present in node_modules/@ohif/app/dist"

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

# ---------------------------------------------------------------------------------------------- production
# Caddy, Redis, Orthanc, web and SCP under Docker compose; the GPU worker natively under systemd (deploy/).
# Settings come from deploy/.env (copy deploy/.env.example). See deploy/README.md.
-include deploy/.env
COMPOSE ?= docker compose
COMPOSE_CMD := $(COMPOSE) -f deploy/docker-compose.yml --env-file deploy/.env
OPENMSK_DATA_HOST_DIR ?= /srv/openmsk/data
UNITS := openmsk-worker
UNIT_DIR ?= /etc/systemd/system
ENV_FILE ?= /etc/openmsk/openmsk.env

.PHONY: prod-setup prod-start prod-stop prod-restart prod-status prod-logs prod-logs-worker prod-logs-web prod-logs-scp

prod-setup: install
	@test -f deploy/.env || { echo "error: copy deploy/.env.example to deploy/.env and fill it in first"; exit 1; }
	@echo "==> user, data directories, environment file"
	id -u openmsk >/dev/null 2>&1 || useradd --system --uid 10001 --home-dir $(OPENMSK_DATA_HOST_DIR) openmsk
	install -d -o 10001 -g 10001 -m 0750 $(OPENMSK_DATA_HOST_DIR) $(OPENMSK_DATA_HOST_DIR)/incoming \
		$(OPENMSK_DATA_HOST_DIR)/uploads $(OPENMSK_DATA_HOST_DIR)/jobs $(OPENMSK_DATA_HOST_DIR)/logs
	install -d -m 0750 $(dir $(ENV_FILE))
	{ cat deploy/.env; echo "OPENMSK_DATA_DIR=$(OPENMSK_DATA_HOST_DIR)"; \
	  echo "OPENMSK_REDIS_URL=redis://:$(REDIS_PASSWORD)@127.0.0.1:6379/0"; \
	  echo "OPENMSK_ORTHANC_URL=http://127.0.0.1:8042"; } > $(ENV_FILE)
	chmod 0640 $(ENV_FILE)
	@echo "==> systemd units (enabled at boot)"
	for unit in $(UNITS); do sed "s#/opt/openmsk#$(CURDIR)#g" deploy/systemd/$$unit.service > $(UNIT_DIR)/$$unit.service; done
	systemctl daemon-reload
	systemctl enable $(addsuffix .service,$(UNITS))
	@echo "==> container images"
	$(COMPOSE_CMD) build

prod-start:
	$(COMPOSE_CMD) up -d
	systemctl start $(addsuffix .service,$(UNITS))

prod-stop:
	systemctl stop $(addsuffix .service,$(UNITS))
	$(COMPOSE_CMD) down

prod-restart: prod-stop prod-start

prod-status:
	$(COMPOSE_CMD) ps
	systemctl --no-pager status $(addsuffix .service,$(UNITS)) || true
	curl -sS https://$(OPENMSK_DOMAIN)/health; echo

prod-logs:
	$(COMPOSE_CMD) logs -f --tail=100 & journalctl -f -n 100 $(addprefix -u ,$(UNITS)); kill %1

prod-logs-worker:
	journalctl -f -n 200 -u openmsk-worker

prod-logs-web:
	$(COMPOSE_CMD) logs -f --tail=200 web

prod-logs-scp:
	$(COMPOSE_CMD) logs -f --tail=200 scp
