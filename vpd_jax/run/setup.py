"""One start-up path for training, evaluation, predictions and benchmarks: `setup(config) -> Run`.

The architecture (a preset, or read from the config.init files), the task (model, constants, tokenizer), the
mesh, the per-host data config and the Trainer (sharded state layout and jitted steps). Nothing is restored or
initialised here: vpd_jax/run/start.py decides where a run's state comes from.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Mapping, Sequence

import jax
import ml_collections

from vpd_jax import parallel
from vpd_jax.models import presets
from vpd_jax.run.trainer import Trainer, build_trainer
from vpd_jax.tasks.base import Task
from vpd_jax.tasks.registry import make_task, task_class
from vpd_jax.weights import load_text_encoder, load_unet, load_vae


@dataclasses.dataclass(frozen=True)
class Run:
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    task: Task
    data: ml_collections.ConfigDict  # config.data with this host's batch sizes
    trainer: Trainer


def setup(config: ml_collections.ConfigDict, *, devices: Sequence[jax.Device] | None = None,
          mesh_shape: Mapping[str, int] | None = None) -> Run:
    """The Run of `config` on `devices` (default: all) with the mesh `mesh_shape` (default: config.mesh)."""
    mesh = parallel.make_mesh(dict(mesh_shape or config.mesh), devices)
    task = make_task(config, resolve_architecture(config))
    data = host_data_config(config, jax.process_count())
    return Run(config, mesh, task, data, build_trainer(config, task, mesh))


def resolve_architecture(config) -> presets.Architecture:
    """The preset named by config.model.arch, or (arch 'init') the architecture of the config.init files (and of
    config.model.text_encoder's folder for tasks with a text encoder)."""
    if config.model.arch != "init":
        return presets.architecture(config.model.arch)
    if not config.init:
        raise ValueError("config.model.arch='init' reads the architecture from config.init, which is empty; set "
                         "config.init to a Stable Diffusion folder/file or config.model.arch to a preset "
                         f"({sorted(presets.ARCHITECTURES)})")
    if not os.path.exists(config.init):
        raise FileNotFoundError(f"config.init={config.init!r}: pretrained weights not found")
    unet, _ = load_unet(config.init, on_host=True)
    vae, _ = load_vae(config.init, on_host=True)
    text = presets.architecture("sd15").text
    if task_class(config.task).uses_text_encoder():  # CLIP-L for SD v1, OpenCLIP-H for SD v2
        text, _ = load_text_encoder(text_encoder_path(config), on_host=True)
        text = text.config
    return presets.Architecture(unet.config, vae.config, text)


def text_encoder_path(config) -> str:
    return config.model.text_encoder or config.init


def check_batch_sizes(config, process_count: int) -> None:
    """The global batch sizes are positive and split evenly over the processes (each reads its share)."""
    for name in ("batch_size", "eval_batch_size"):
        if config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be positive")
        if config[name] % process_count:
            raise ValueError(f"config.{name}={config[name]} is not divisible by the {process_count} processes")


def host_data_config(config, process_count: int) -> ml_collections.ConfigDict:
    """config.data with the per-host batch sizes derived from the global ones."""
    check_batch_sizes(config, process_count)
    data = copy.deepcopy(config.data)
    data.unlock()
    data.batch_size_per_host = config.batch_size // process_count
    data.eval_batch_size_per_host = config.eval_batch_size // process_count
    data.lock()
    return data
