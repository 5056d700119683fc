"""Sharded training: `train_and_evaluate(config, workdir)` is what train.py runs.

Flow: checks that need nothing built (config values and paths, the workdir, and whether the workdir's checkpoint
may be continued with this config: start.py) -> setup (setup.py: architecture, task, mesh, per-host data config,
sharded state layout) -> checks against the model's shapes (the checkpoint to resume, config.init's weights) and the
mesh -> per-host input pipeline -> start state (start.py: workdir checkpoint, config.resume, config.init pretrained
weights, scratch, created or restored directly in its shards) -> jitted train step over global batches (trainer.py)
-> logs, checkpoints (state + tf.data iterator, per process), periodic evaluation (evaluation.py) and the best
checkpoint by the task's metric (best.py).

Nothing is written to the workdir before every check has passed; a run refused at start leaves it as it was.
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from vpd_jax.data import pipelines
from vpd_jax.data import prepare as preparation
from vpd_jax.data.config import family
from vpd_jax.parallel import device_batch
from vpd_jax.run import checkpoint, evaluation, logs, start
from vpd_jax.run.best import BestCheckpoint
from vpd_jax.run.init_rng import check_init_rng
from vpd_jax.run.setup import check_batch_sizes, setup
from vpd_jax.run.trainer import NONFINITE_COUNTERS, Trainer


class NonFiniteError(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------ non-finite steps


class NonFiniteGuard:
    """The host side of the non-finite guard. The train step never applies a non-finite step and counts it in the
    state (trainer.NONFINITE_COUNTERS); `check` reads the counters at every log and before every checkpoint:
      'stop'   raises at the first non-finite step since this process started;
      'skip'   logs a warning with the running count when there are new ones, and raises once `max_consecutive`
               consecutive train steps were non-finite (a run that skips every step trains nothing).
    Raising before a checkpoint keeps a state that should have stopped out of every checkpoint.
    """

    def __init__(self, policy: str, max_consecutive: int, *, start_step: int = 0, start_count: int = 0,
                 ckpt: checkpoint.Checkpointer | None = None):
        self.policy, self.max_consecutive, self.ckpt = policy, max_consecutive, ckpt
        self.start_step, self.start_count = start_step, start_count
        self.seen, self.checked_step = start_count, start_step

    @classmethod
    def for_run(cls, config, started: start.StartState, ckpt: checkpoint.Checkpointer) -> "NonFiniteGuard":
        return cls(config.nonfinite, config.nonfinite_max_consecutive, start_step=started.step,
                   start_count=int(started.state["nonfinite"]), ckpt=ckpt)

    def check(self, state: dict, step: int) -> None:
        counts = {k: int(v) for k, v in jax.device_get({k: state[k] for k in NONFINITE_COUNTERS}).items()}
        since = self.checked_step
        new = counts["nonfinite"] - self.seen
        self.seen, self.checked_step = counts["nonfinite"], step
        if new and self.policy == "stop":
            where = (f"at train step {counts['first_nonfinite_step']}" if self.start_count == 0
                     else f"between train steps {since + 1} and {step}")
            raise NonFiniteError(
                f"non-finite loss, gradient or update {where} ({counts['nonfinite'] - self.start_count} such step(s) "
                f"so far): the loss, the gradient norm, the learning rate or the norm of the parameters it would "
                f"give was NaN or infinite, so that update was not applied. {self._intact()} "
                "Resuming repeats the same steps: change what made them non-finite first (e.g. a lower "
                "config.optim.lr, which a resumed run may change), or skip such steps with config.nonfinite='skip'.")
        if new:
            logging.warning("train steps %d-%d: %d non-finite step(s) skipped, %d in this run so far (their updates "
                            "were not applied; %d consecutive up to step %d; config.nonfinite_max_consecutive=%d "
                            "stops the run)", since + 1, step, new, counts["nonfinite"] - self.start_count,
                            counts["nonfinite_streak"], step, self.max_consecutive)
        streak, end = counts["nonfinite_streak"], step
        if counts["longest_nonfinite_streak_end"] > self.start_step and counts["longest_nonfinite_streak"] > streak:
            streak, end = counts["longest_nonfinite_streak"], counts["longest_nonfinite_streak_end"]
        if self.policy == "skip" and streak >= self.max_consecutive:
            raise NonFiniteError(
                f"train steps {end - streak + 1} to {end}: {streak} consecutive non-finite steps, none of them "
                f"applied (config.nonfinite_max_consecutive={self.max_consecutive}): the run is not training. "
                f"{self._intact()} Change what makes the steps non-finite (e.g. a lower config.optim.lr, which a "
                "resumed run may change) before resuming.")

    def _intact(self) -> str:
        latest = self.ckpt.latest_step() if self.ckpt is not None else None
        if latest is None:
            return "This run has written no checkpoint, and writes none of this state."
        return (f"This state is not checkpointed; the last checkpoint, {self.ckpt.directory / str(latest)}, is "
                "intact.")

    def summary(self, step: int) -> None:
        """A closing warning when the run skipped steps."""
        skipped = self.seen - self.start_count
        if skipped:
            logging.warning("%d of the %d train steps of this run were non-finite and skipped", skipped,
                            step - self.start_step)


# ------------------------------------------------------------------------------------- checks before building


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Fails at start, naming the key, on values the loop cannot use, on paths the run may read that do not exist,
    and on a workdir it cannot write (instead of minutes later); reads and writes nothing but file metadata."""
    if config.nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}; use 'stop' or 'skip'")
    for key in ("total_steps", "log_every", "ckpt_every", "keep_ckpts", "nonfinite_max_consecutive"):
        if config[key] <= 0:
            raise ValueError(f"config.{key}={config[key]} must be positive")
    for key in ("eval_every", "eval_max_batches", "eval_panels", "steps_per_epoch"):
        if config[key] < 0:
            raise ValueError(f"config.{key}={config[key]} must be 0 or more")
    check_init_rng(config.init_rng)
    check_batch_sizes(config, jax.process_count())
    for key in ("init", "resume"):
        if config[key] and not os.path.exists(config[key]):
            raise FileNotFoundError(f"config.{key}={config[key]!r} does not exist")
    for key in ("text_encoder", "tokenizer", "class_embeddings"):
        path = config.model.get(key)
        if path and path not in ("hash", "random") and not os.path.exists(path):
            raise FileNotFoundError(f"config.model.{key}={path!r} does not exist")
    if workdir is not None:
        logs.check_workdir(workdir)


def check_batches_fit_mesh(config, trainer: Trainer) -> None:
    """The global batches split evenly over the devices of the mesh axes that shard the batch (data x fsdp)."""
    axes, devices = trainer.batch_sharding.spec[0], evaluation.batch_devices(trainer)
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % devices:
            raise ValueError(f"config.{key}={config[key]} does not split over the {devices} devices of the mesh "
                             f"axes {axes} that shard the batch (mesh {dict(trainer.mesh.shape)}): use a multiple of "
                             f"{devices}, or another config.mesh")


# ------------------------------------------------------------------------------------------------- the loop


def prepare_data(data) -> None:
    """Builds the dataset on first use when nothing needs downloading (vpd_shapes) or when `data.manual_dir` holds
    the downloaded files (python -m vpd_jax.data.prepare does the same beforehand): process 0 builds, the others
    wait. Data that are missing with no manual_dir is an error naming the prepare command."""
    generated = family(data.name) == "vpd_shapes"
    if not generated and preparation.is_prepared(data.name, data.data_dir):
        return
    if not (generated or data.manual_dir):
        where = data.data_dir or "TFDS' default data_dir"
        raise FileNotFoundError(
            f"{data.name} is not prepared in {where}: give --config.data.manual_dir=<the downloaded files> to prepare "
            f"it now, or run python -m vpd_jax.data.prepare {data.name} --manual_dir=... --data_dir=... first "
            "(docs/datasets.md says what to download)")
    if jax.process_index() == 0:
        pipelines.prepare(data)
    multihost_utils.sync_global_devices(f"prepared {data.name}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final evaluation."""
    check_config(config, workdir)
    found = start.workdir_checkpoint(os.path.join(workdir, "checkpoints"))
    if found is not None:
        start.check_resume(found, config, jax.process_count())
    run = setup(config)
    mesh, trainer = run.mesh, run.trainer
    pretrained = None
    if found is not None:
        start.check_checkpoint_fits(found, trainer, config)
    elif config.resume:
        start.check_resume_source_fits(config, trainer)
    elif config.init:
        pretrained = start.read_pretrained(trainer, config.init)
    check_batches_fit_mesh(config, trainer)
    if found is not None:
        start.log_resume_differences(found, config)
    logging.info("mesh %s on %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count())
    prepare_data(run.data)
    logging.info("building the input pipeline of %s (%s)", run.data.name, run.data.split)
    train_iter = pipelines.make_train_iterator(run.data, tokenizer=run.task.tokenizer)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_ckpts,
                                   save_interval_steps=config.ckpt_every, async_save=config.async_ckpt)
    writer = best = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
            logging.info("building the start state in its shards (compiling its initialiser or restoring)")
            started = start.start_state(config, trainer, ckpt, train_iter, pretrained)
            del pretrained  # placed in the state: the host copies can go
            logging.info("starting at step %d (%s%s)", started.step, started.source,
                         f": {started.path}" if started.path else "")
            # After the start state: a run refused by the workdir's checkpoint leaves that run's record alone.
            logs.write_run_metadata(workdir, config)
            logging.info("config (also in %s):\n%s", os.path.join(workdir, "config.json"), config)
            writer = logs.MetricWriter(workdir)
            evaluator = evaluation.Evaluator(trainer, run.data)
            best = BestCheckpoint(workdir, run.task.best_metric)

            def evaluate(state, step):
                result = evaluator.run_and_log(state, step, workdir, writer)
                best.offer(state, step, result, config)
                return result

            if config.eval_at_start and started.step == 0:
                evaluate(started.state, 0)
            guard = NonFiniteGuard.for_run(config, started, ckpt)
            state = _train(config, trainer, started, train_iter, ckpt, writer, evaluate, guard)
            result = evaluate(state, max(started.step, config.total_steps))
    finally:
        ckpt.wait_until_finished()  # a failing run still completes the saves it started (the last good step)
        ckpt.close()
        if writer is not None:
            writer.close()
        if best is not None:
            best.close()
    return result


def _train(config, trainer, started: start.StartState, train_iter, ckpt: checkpoint.Checkpointer,
           writer: logs.MetricWriter, evaluate, guard: NonFiniteGuard) -> dict:
    """The loop from started.step to config.total_steps: steps, logs, checkpoints (the last one forced so that the
    final state is always saved) and periodic evaluation. Returns the final state."""
    state, step = started.state, started.step
    constants = jax.device_put(trainer.task.constants, trainer.replicated)
    step_fn = trainer.jit_train_step()
    progress = logs.Progress(started.step, config.total_steps, config.batch_size)
    loss_sum, interval = 0.0, 0  # the loss summed on the device over the steps since the last log
    while step < config.total_steps:
        batch = device_batch(next(train_iter), trainer.batch_sharding)
        first = step == started.step
        if first:
            logging.info("compiling the train step (the first step takes that long)")
            compile_start = time.perf_counter()
        state, metrics = step_fn(state, batch, constants)
        step += 1
        if first:
            jax.block_until_ready(metrics)
            progress.compiled(step, compile_start)
        loss_sum, interval = loss_sum + metrics["loss"], interval + 1
        last = step == config.total_steps
        if step % config.log_every == 0 or last:
            guard.check(state, step)
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            # The interval's mean loss (a skipped non-finite step counts with its loss, as the guard reports it).
            scalars["loss"] = float(loss_sum) / interval
            scalars["last_loss"] = float(metrics["loss"])
            loss_sum, interval = 0.0, 0
            scalars.update(progress.update(step, scalars["loss"], scalars["lr"]),
                           nonfinite_steps=int(state["nonfinite"]))
            writer.write(step, scalars, prefix="train/")
        if ckpt.should_save(step) or last:
            guard.check(state, step)  # a checkpoint never holds a run that should have stopped
            ckpt.save(step, state, data_iterator=train_iter, config=config, force=last)
        if config.eval_every and step % config.eval_every == 0 and not last:
            evaluate(state, step)
    guard.summary(step)
    return state
