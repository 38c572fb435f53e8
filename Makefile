# The two commands: `make demo` (the main job on embedded defaults) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install engine test-deps bench-deps services demo docs test test-unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The real engines the integration tests serve: vLLM and SGLang (CPU builds) and the
# SmolLM2 checkpoint.
engine:
	bash scripts/engine.sh
	bash scripts/sglang.sh

# Tools the tests check output with (promtool, from Debian's prometheus package).
test-deps:
	bash scripts/test-deps.sh

# What the benchmarks drive load with (wrk); the unit tests check that path too.
bench-deps:
	bash scripts/bench-deps.sh

demo: install
	$(BIN)/dynasorctl demo

# What the store and router tests run against: Debian's PostgreSQL server (started and
# stopped by the tests themselves) and the PyPI builds of vLLM's and SGLang's routers.
services:
	bash scripts/postgres.sh
	bash scripts/routers.sh

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or
# an unknown reference marker. Offline: nothing is fetched at build time.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test-unit: install test-deps bench-deps services docs
	$(BIN)/pytest -m "not engine" -q

test: install engine test-deps bench-deps services docs
	$(BIN)/pytest -q

bench: install bench-deps
	$(BIN)/dynasorctl bench proxy

clean:
	rm -rf $(VENV) .venv-engine .venv-sglang .venv-router .cache site
