"""The VPD tasks of the smoke configs (tiny architecture, vpd_shapes sizes) with host-random variables."""
from __future__ import annotations

from typing import Any

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
