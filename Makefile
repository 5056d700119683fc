# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; a file stays on one worker, so its module fixtures are
# built once). XLA:CPU compiles each program on one thread, so a core per worker is what the suite can use.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast bench venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-test.txt -c constraints.txt
	touch $(STAMP)

# Train VPD segmentation and depth from scratch on vpd_shapes (CPU, minutes); results in runs/demo/.
demo: $(STAMP)
	$(PY) -m vpd_jax.apps.demo --workdir=runs/demo

# The whole suite, as CI runs it.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=25 $(PYTEST_ARGS) tests

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" $(PYTEST_ARGS) tests

# Benchmarks of issue 8 (python -m bench.run): rewrites BENCHMARKS.md and bench/results.json.
bench: $(STAMP)
	$(PY) -m bench.run

clean-venv:
	rm -rf $(VENV)
