"""Test-session setup: 8 fake CPU devices (mesh tests), fast XLA compiles, TF kept quiet, one compilation cache for
the session and the subprocesses its tests start.

The suite's cost is dominated by XLA:CPU compile time, not by running the tiny models. Backend optimisation
level 0 without the fusion emitters compiles 2-3x faster and changes no result beyond float rounding (the
parity tests run under the same flags). Subprocesses started by tests inherit these variables.

One persistent compilation cache, in a fresh directory per test session (unless JAX_COMPILATION_CACHE_DIR is already
set), serves this process, the pytest-xdist workers (`make test` runs the test files on TEST_WORKERS processes; they
inherit the variable from the controller, which imports this file before it starts them) and the subprocesses the
tests start (train.py, predict.py, the demo, the benchmark), so a program that two tests compile, e.g. a smoke
config's train step, is compiled once. The process that made the directory removes it at the end of the session.
"""
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

from tests.helpers import cpu_report  # noqa: E402

# --cpu-report=FILE (tests/helpers/cpu_report.py): pytest finds these hooks by their names in this module.
pytest_addoption = cpu_report.pytest_addoption
pytest_configure = cpu_report.pytest_configure
pytest_runtest_protocol = cpu_report.pytest_runtest_protocol
pytest_terminal_summary = cpu_report.pytest_terminal_summary

# Must happen before the backend initialises; tests that need a mesh use jax.devices()[:8].
jax.config.update("jax_num_cpu_devices", 8)

_SESSION_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="vpd_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
# This process uses it too: tests that build equal programs under different jit wrappers (a trainer per test)
# then compile each once.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
