"""Test-session setup: 8 fake CPU devices (mesh tests), fast XLA compiles, TF kept quiet, one compilation cache for
the subprocesses the tests start.

The suite's cost is dominated by XLA:CPU compile time, not by running the tiny models. Backend optimisation
level 0 without the fusion emitters compiles 2-3x faster and changes no result beyond float rounding (the
parity tests run under the same flags). Subprocesses started by tests inherit these variables.

Subprocesses (train.py, predict.py, the demo, the benchmark) also inherit JAX_COMPILATION_CACHE_DIR: a persistent
compilation cache in a fresh directory per test session (unless the variable is already set), so a program that
two subprocess tests compile, e.g. a smoke config's train step, is compiled once. It is set after JAX is imported
here, so this process keeps compiling without it. The directory is removed at the end of the session.
"""
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

# Must happen before the backend initialises; tests that need a mesh use jax.devices()[:8].
jax.config.update("jax_num_cpu_devices", 8)

_SUBPROCESS_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _SUBPROCESS_CACHE = tempfile.mkdtemp(prefix="vpd_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SUBPROCESS_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _SUBPROCESS_CACHE:
        shutil.rmtree(_SUBPROCESS_CACHE, ignore_errors=True)
