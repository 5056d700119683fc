# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

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
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS) tests

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# Benchmarks of issue 8 (python -m bench.run): rewrites BENCHMARKS.md and bench/results.json.
bench: $(STAMP)
	$(PY) -m bench.run

clean-venv:
	rm -rf $(VENV)
