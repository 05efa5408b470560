# dmoe: two commands do all the set-up on a fresh clone.
#   make demo   - run the default local swarm simulation (nodes, trainer, churn, home links) and write a report
#   make test   - install everything the tests need and run the whole suite
#   make test-fast - only the fast tests (no real process): the inner loop while editing
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup system-deps demo test test-fast lint proto compose-demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	sh scripts/system_deps.sh

demo: setup
	$(VENV)/bin/dmoe simulate --out runs/demo

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m dmoe.wire.protogen --check

# Two test processes: most tests wait on real processes and timers, so two share the 2 cores well;
# a test file stays on one worker (its module fixtures start once).
TEST_WORKERS ?= 2

test: setup system-deps lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(VENV)/bin/pytest -q -m "not integration and not docker"

proto: setup
	$(PY) -m dmoe.wire.protogen

compose-demo: setup system-deps
	$(PY) scripts/compose_demo.py

clean:
	rm -rf $(VENV) runs build *.egg-info
