"""Test-session setup: 8 fake CPU devices (mesh tests), fast XLA compiles, TF kept quiet.

The suite's cost is dominated by XLA:CPU compile time, not by running the tiny models. Backend optimisation
level 0 without the fusion emitters compiles 2-3x faster and changes no result beyond float rounding (the
parity tests run under the same flags). Subprocesses started by tests inherit these variables.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402

# Must happen before the backend initialises; tests that need a mesh use jax.devices()[:8].
jax.config.update("jax_num_cpu_devices", 8)
