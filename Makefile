# itloop: `make demo` runs the main job on the embedded default; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres
SYSTEM_PACKAGES := xvfb libjack-jackd2-0 chromium chromium-driver

.PHONY: demo test install system-packages lint typecheck contracts compose-check pytest-sqlite pytest-postgresql clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[gpu,dev,rig]'
	# torchattacks pins an old requests (and so idna<3); it needs only torch at run time
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  $$SUDO apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || echo "warning: could not install$$missing; tests that need them will skip"; \
	fi

demo: install
	$(BIN)/itloop demo --out ./itloop-data/demo-$$(date +%Y%m%d-%H%M%S) $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check itloop tests
	$(BIN)/ruff format --check itloop tests

typecheck: install
	$(BIN)/mypy itloop

contracts: install
	$(BIN)/lint-imports

compose-check: install
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

pytest-sqlite: install system-packages
	ITLOOP_TEST_DATABASES=sqlite $(BIN)/pytest

pytest-postgresql: install
	@if $(BIN)/python -c "import sqlalchemy as sa, sys; e = sa.create_engine('$(PG_URL)', connect_args={'connect_timeout': 3}); e.connect().close()" 2>/dev/null; then \
	  ITLOOP_TEST_DATABASES=postgresql $(BIN)/pytest -m db; \
	else \
	  echo "SKIPPED the PostgreSQL pass: no PostgreSQL server answers at 127.0.0.1:5432"; \
	fi

test: lint typecheck contracts compose-check pytest-sqlite pytest-postgresql

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
