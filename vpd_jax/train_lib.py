"""Sharded training: `train_and_evaluate(config, workdir)` is what train.py runs.

Flow: mesh from config -> task (model, constants, tokenizer) -> per-host input pipeline -> abstract state
(eval_shape) -> shardings from the logical axis names -> state restored or created directly in its shards
(workdir checkpoint, config.resume, config.init pretrained weights, scratch) -> jitted train step over global
batches -> logs, checkpoints (state + tf.data iterator, per process), periodic evaluation. See trainer.py for
the state and the step.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from vpd_jax import checkpoint, eval_lib, parallel, tasks, train_log
from vpd_jax.data import pipelines
from vpd_jax.data.config import family
from vpd_jax.trainer import build_trainer, device_batch, host_data_config, load_pretrained, resolve_architecture


class NonFiniteError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------------- the loop


def prepare_generated_data(data) -> None:
    """Builds vpd_shapes (rendered, nothing to download) on first use: process 0 builds, the others wait.
    Real datasets are prepared beforehand from their downloaded files (README)."""
    if family(data.name) != "vpd_shapes":
        return
    if jax.process_index() == 0:
        pipelines.prepare(data)
    multihost_utils.sync_global_devices(f"prepared {data.name}")


def _check_finite(state: dict, policy: str) -> None:
    count = int(state["nonfinite"])
    if count and policy == "stop":
        raise NonFiniteError(f"non-finite loss or gradient at step {int(state['last_nonfinite_step'])}; the update "
                             f"was not applied and the last checkpoint is intact (config.nonfinite='skip' skips such "
                             f"steps instead)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final evaluation."""
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}; use 'stop' or 'skip'")
    if config.total_steps <= 0:
        raise ValueError(f"config.total_steps={config.total_steps} must be positive")
    train_log.write_run_metadata(workdir, config)
    mesh = parallel.make_mesh(dict(config.mesh))
    logging.info("mesh %s on %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count())
    task = tasks.make_task(config, resolve_architecture(config))
    data = host_data_config(config, jax.process_count())
    prepare_generated_data(data)
    train_iter = pipelines.make_train_iterator(data, tokenizer=task.tokenizer)
    trainer = build_trainer(config, task, mesh, data, train_iter.dataset)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_ckpts,
                                   save_interval_steps=config.ckpt_every, async_save=config.async_ckpt)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        create = jax.jit(trainer.create_state, out_shardings=trainer.state_shardings)
        start = checkpoint.restore_or_initialize(
            ckpt, abstract_state=trainer.abstract_state, init_fn=lambda: create(jax.random.key(config.seed)),
            data_iterator=train_iter, resume=config.resume, init=config.init,
            load_init=lambda state, path: load_pretrained(trainer, state, path))
        logging.info("starting at step %d (%s%s)", start.step, start.source, f": {start.path}" if start.path else "")
        state = start.state
        constants = jax.device_put(task.constants, trainer.replicated)
        step_fn = trainer.jit_train_step()
        writer = train_log.MetricWriter(workdir)
        progress = train_log.Progress(start.step, config.total_steps, config.batch_size)
        evaluator = eval_lib.Evaluator(trainer, data)
        step = start.step
        try:
            while step < config.total_steps:
                batch = device_batch(next(train_iter), trainer.batch_sharding)
                state, metrics = step_fn(state, batch, constants)
                step += 1
                if step % config.log_every == 0 or step == config.total_steps:
                    _check_finite(state, config.nonfinite)
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    scalars.update(progress.update(step), nonfinite_steps=int(state["nonfinite"]))
                    writer.write(step, scalars, prefix="train/")
                if ckpt.should_save(step) or step == config.total_steps:
                    _check_finite(state, config.nonfinite)
                    ckpt.save(step, state, data_iterator=train_iter, config=config, force=step == config.total_steps)
                if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
                    evaluator.run_and_log(state, step, workdir, writer)
            result = evaluator.run_and_log(state, step, workdir, writer)
        finally:
            ckpt.wait_until_finished()
            ckpt.close()
        writer.close()
    return result
