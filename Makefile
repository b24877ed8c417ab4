# DO-LAB: `make run` starts the hub on the embedded default; `make test` installs and starts everything the
# tests need, then runs ruff, mypy and pytest.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODE_PREFIX := .dolab/node
NPM_PROXY := $(NODE_PREFIX)/node_modules/.bin/configurable-http-proxy
OIDC_DIR := .dolab/oidc

.PHONY: run test test-parts lint typecheck pytest proxy clean help stack-up stack-down labextension

help:
	@echo "make run    start DO-LAB at http://127.0.0.1:8000 (creates .venv, installs DO-LAB and the proxy)"
	@echo "make test   install and start everything the tests need, then run ruff, mypy and pytest"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "DO-LAB needs Python 3.10 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[lab]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

# configurable-http-proxy: npm's when Node is there (JupyterHub's own choice), else the PyPI port.
proxy:
	@if [ -x $(NPM_PROXY) ] || [ -x $(BIN)/configurable-http-proxy ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
		echo "Installing configurable-http-proxy (npm) into $(NODE_PREFIX)"; \
		npm install --silent --no-audit --no-fund --prefix $(NODE_PREFIX) configurable-http-proxy@5; \
	else \
		echo "No npm: installing the PyPI configurable-http-proxy"; \
		$(BIN)/pip install --quiet configurable-http-proxy; \
	fi

# The culler's JupyterLab notice (dolab_lab/labextension, pinned by its package-lock.json), built
# into the git-ignored dolab_lab/share/ that users' servers load; again only when its sources change.
LABEXT := dolab_lab/labextension
LABEXT_BUILT := dolab_lab/share/labextensions/dolab-culler-notice/package.json

labextension: $(LABEXT_BUILT)

# npm ci only when the pinned packages change; the build (tsc and @jupyterlab/builder, seconds) when a source does.
$(LABEXT)/node_modules/.package-lock.json: $(LABEXT)/package.json $(LABEXT)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "No npm: the culler's JupyterLab notice is not built (servers start without it)"; exit 0; }; \
	echo "Installing the JupyterLab notice's build tools (npm ci) in $(LABEXT)"; \
	cd $(LABEXT) && npm ci --silent --no-audit --no-fund --ignore-scripts && touch node_modules/.package-lock.json

$(LABEXT_BUILT): $(LABEXT)/node_modules/.package-lock.json $(LABEXT)/tsconfig.json $(wildcard $(LABEXT)/src/*.ts) | $(BIN)/python
	@[ -d $(LABEXT)/node_modules ] || exit 0; \
	echo "Building the culler's JupyterLab notice into dolab_lab/share"; \
	core="$$($(BIN)/python -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')" && \
	cd $(LABEXT) && JUPYTERLAB_CORE="$$core" npm run --silent build >/dev/null && \
	touch ../share/labextensions/dolab-culler-notice/package.json

run: $(VENV)/.installed-run proxy labextension
	$(BIN)/jupyterhub -f jupyterhub_config.py

# Parts the tests drive for real: Debian's Chromium for the browser tests.
test-parts:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@# The OpenID Connect provider of tests/e2e/auth (npm oidc-provider, pinned by tests/oidc/package-lock.json).
	@cmp -s tests/oidc/package-lock.json $(OIDC_DIR)/package-lock.json && [ -d $(OIDC_DIR)/node_modules/oidc-provider ] || { \
		echo "Installing oidc-provider (npm) into $(OIDC_DIR)"; mkdir -p $(OIDC_DIR) && \
		cp tests/oidc/package.json tests/oidc/package-lock.json $(OIDC_DIR)/ && \
		npm ci --silent --no-audit --no-fund --prefix $(OIDC_DIR); }
	@# Debian's PostgreSQL for the monitor's ledger tests (tests/monitor/conftest.py starts and stops its own server).
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "Installing Debian's postgresql for the ledger tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# The real Docker engines and the single-user test image (tests/stack.py); `stack-down` stops what `up` started.
stack-up: $(VENV)/.installed-test
	$(BIN)/python tests/stack.py up

stack-down:
	$(BIN)/python tests/stack.py down

# pytest between stack-up and stack-down; the stack comes down even when pytest fails, and pytest's status is kept.
# It ends with its 30 slowest steps: where to look when the suite gets slower. Its header says how far the waits
# stretch on this machine (tests/patience.py; DOLAB_TEST_PATIENCE=<factor> sets it).
pytest: $(VENV)/.installed-test proxy test-parts labextension
	$(BIN)/python tests/stack.py up && { $(BIN)/pytest -ra --durations=30; rc=$$?; $(BIN)/python tests/stack.py down; exit $$rc; }

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .dolab .pytest_cache .mypy_cache .ruff_cache *.egg-info
