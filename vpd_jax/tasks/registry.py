"""The task registry: every module that needs something of a task by name (its config sections, data pipeline,
optimizer preset, example inputs, model) asks here. Adding a task is one class and one line below."""
from __future__ import annotations

import ml_collections

from vpd_jax.models.presets import Architecture
from vpd_jax.tasks.base import Task
from vpd_jax.tasks.ldznet import LDZNetTask
from vpd_jax.tasks.probe import ProbeTask
from vpd_jax.tasks.vpd import DepthTask, ReferTask, SegTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SegTask, DepthTask, ReferTask, LDZNetTask, ProbeTask)}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}; tasks are {sorted(TASKS)}")
    return TASKS[name]


def make_task(config: ml_collections.ConfigDict, arch: Architecture) -> Task:
    return task_class(config.task)(config, arch)
