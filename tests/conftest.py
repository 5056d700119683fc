"""Test-session setup: 8 fake CPU devices (mesh tests), TF kept off accelerators, quiet logs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

# Must happen before the backend initialises; tests that need a mesh use jax.devices()[:8].
jax.config.update("jax_num_cpu_devices", 8)
