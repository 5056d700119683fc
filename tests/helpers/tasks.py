"""The VPD tasks of the smoke configs (tiny architecture, vpd_shapes sizes) with host-random variables, and their
models' inference forward compiled once per session."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from tests.helpers.variables import random_variables
from tests.test_configs import get_config
from vpd_jax.models import presets
from vpd_jax.tasks.base import Task
from vpd_jax.tasks.registry import make_task

SMOKE_CONFIGS = {"seg": "vpd_seg_ade20k.py", "depth": "vpd_depth_nyu.py", "refer": "vpd_refer.py"}


def smoke_config(task: str, **overrides: Any) -> ml_collections.ConfigDict:
    """configs/<task file>:smoke with dotted-key overrides ('eval.depth_shift_size': 2)."""
    config = get_config(SMOKE_CONFIGS[task], "smoke")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def smoke_task(task: str, seed: int = 0, **overrides: Any) -> tuple[Task, dict]:
    """The task of `smoke_config(task, **overrides)` on the tiny architecture, and random variables for it."""
    built = make_task(smoke_config(task, **overrides), presets.architecture("tiny"))
    example = built.example_batch(1)
    return built, random_variables(built.model, *built.model_args(example, built.constants), train=False, seed=seed)


@functools.lru_cache(maxsize=None)
def model_forward(model: nn.Module, intermediates: bool = False):
    """`model`'s inference forward, (variables, *model args) -> output, or -> (output, the sown feature pyramid)
    with `intermediates`; jitted once per session for equal models, so the test modules that run a smoke model at
    the same shapes share its compilation."""
    def forward(variables, *args):
        if not intermediates:
            return model.apply(variables, *args, train=False)
        output, state = model.apply(variables, *args, train=False, mutable=["intermediates"])
        return output, state["intermediates"]["features"][0]

    return jax.jit(forward)
