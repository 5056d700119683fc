"""Sharded training: `train_and_evaluate(config, workdir)` is what train.py runs.

Flow: setup (setup.py: architecture, task, mesh, per-host data config, sharded state layout) -> per-host input
pipeline -> start state (start.py: workdir checkpoint, config.resume, config.init pretrained weights, scratch,
created or restored directly in its shards) -> jitted train step over global batches (trainer.py) -> logs,
checkpoints (state + tf.data iterator, per process), periodic evaluation (evaluation.py).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from vpd_jax.data import pipelines
from vpd_jax.data.config import family
from vpd_jax.parallel import device_batch
from vpd_jax.run import checkpoint, evaluation, logs
from vpd_jax.run.setup import setup
from vpd_jax.run.start import StartState, start_state


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
        raise NonFiniteError(f"non-finite loss, gradient or update at train step {int(state['first_nonfinite_step'])}"
                             f" ({count} such step(s) so far); no such update was applied and the last checkpoint is "
                             "intact (config.nonfinite='skip' skips these steps instead)")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails at start, naming the key, on values the loop cannot use and on paths the run may read that do not
    exist (instead of minutes later)."""
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}; use 'stop' or 'skip'")
    for key in ("total_steps", "log_every", "ckpt_every"):
        if config[key] <= 0:
            raise ValueError(f"config.{key}={config[key]} must be positive")
    for key in ("init", "resume"):
        if config[key] and not os.path.exists(config[key]):
            raise FileNotFoundError(f"config.{key}={config[key]!r} does not exist")
    for key in ("text_encoder", "tokenizer", "class_embeddings"):
        path = config.model.get(key)
        if path and path not in ("hash", "random") and not os.path.exists(path):
            raise FileNotFoundError(f"config.model.{key}={path!r} does not exist")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final evaluation."""
    check_config(config)
    run = setup(config)
    mesh, trainer = run.mesh, run.trainer
    logging.info("mesh %s on %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count())
    prepare_generated_data(run.data)
    train_iter = pipelines.make_train_iterator(run.data, tokenizer=run.task.tokenizer)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_ckpts,
                                   save_interval_steps=config.ckpt_every, async_save=config.async_ckpt)
    writer = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
            start = start_state(config, trainer, ckpt, train_iter)
            logging.info("starting at step %d (%s%s)", start.step, start.source,
                         f": {start.path}" if start.path else "")
            # After the start state: a run refused by the workdir's checkpoint leaves that run's record alone.
            logs.write_run_metadata(workdir, config)
            writer = logs.MetricWriter(workdir)
            evaluator = evaluation.Evaluator(trainer, run.data)

            def evaluate(state, step):
                return evaluator.run_and_log(state, step, workdir, writer)

            if config.eval_at_start and start.step == 0:
                evaluate(start.state, 0)
            state = _train(config, trainer, start, train_iter, ckpt, writer, evaluate)
            result = evaluate(state, max(start.step, config.total_steps))
    finally:
        ckpt.wait_until_finished()  # a failing run still completes the saves it started (the last good step)
        ckpt.close()
        if writer is not None:
            writer.close()
    return result


def _train(config, trainer, start: StartState, train_iter, ckpt: checkpoint.Checkpointer,
           writer: logs.MetricWriter, evaluate) -> dict:
    """The loop from start.step to config.total_steps: steps, logs, checkpoints (the last one forced so that the
    final state is always saved) and periodic evaluation. Returns the final state."""
    state, step = start.state, start.step
    constants = jax.device_put(trainer.task.constants, trainer.replicated)
    step_fn = trainer.jit_train_step()
    progress = logs.Progress(start.step, config.total_steps, config.batch_size)
    while step < config.total_steps:
        batch = device_batch(next(train_iter), trainer.batch_sharding)
        state, metrics = step_fn(state, batch, constants)
        step += 1
        last = step == config.total_steps
        if step % config.log_every == 0 or last:
            _check_finite(state, config.nonfinite)
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars.update(progress.update(step), nonfinite_steps=int(state["nonfinite"]))
            writer.write(step, scalars, prefix="train/")
        if ckpt.should_save(step) or last:
            _check_finite(state, config.nonfinite)  # a checkpoint never holds a run that should have stopped
            ckpt.save(step, state, data_iterator=train_iter, config=config, force=last)
        if config.eval_every and step % config.eval_every == 0 and not last:
            evaluate(state, step)
    return state
