# Two commands matter: `make run` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install services run test bench proto clean

# Re-install only when the project's metadata changed; an editable install picks up code edits.
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[worker,dev,bench]'
	touch $(STAMP)

# Services the tests start on loopback (real redis-server, headless Chromium for the status page).
services:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

# The single-machine platform: controller, one local worker, the demo model (cold + warm call shown).
run: install
	$(BIN)/ember serve --demo

test: install services
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/loader.py

proto: install
	$(BIN)/python -m ember.api.codegen

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
