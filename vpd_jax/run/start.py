"""Where a run's state comes from, in one place. In order (`start_state`):

  1. this workdir's latest complete checkpoint: state and data iterator, an exact continuation;
  2. `config.resume`: another run's checkpoint directory or step directory (full state; the input starts afresh);
  3. `config.init`: pretrained Stable Diffusion weights, loaded into a freshly created state (`load_pretrained`);
  4. scratch.

Evaluation and predictions restore one step of a run (`restore_step`). Every state is created or restored directly
in its shards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax import parallel
from vpd_jax.run import checkpoint
from vpd_jax.run.setup import text_encoder_path
from vpd_jax.run.trainer import Trainer
from vpd_jax.tasks.base import Task
from vpd_jax.weights import load_text_encoder, load_unet, load_vae


@dataclasses.dataclass
class StartState:
    state: Any
    step: int  # the step of the restored checkpoint; 0 for init / scratch
    source: str  # "workdir", "resume", "init" or "scratch"
    path: str | None = None  # where it came from


def _resume_location(path: str) -> tuple[epath.Path, int | None]:
    """(checkpoint root, step) for `config.resume`: a run's checkpoint directory (its latest step) or one step
    directory `<root>/<step>`."""
    location = epath.Path(path)
    if not location.exists():
        raise FileNotFoundError(f"config.resume={path!r} does not exist")
    if (location / checkpoint.STATE).exists() and location.name.isdigit():
        return location.parent, int(location.name)
    return location, None


def restore_or_initialize(
    checkpointer: checkpoint.Checkpointer,
    *,
    abstract_state: Any,
    init_fn: Callable[[], Any],
    data_iterator: Any = None,
    resume: str | None = None,
    init: str | None = None,
    load_init: Callable[[Any, str], Any] | None = None,
) -> StartState:
    """The state to start from, in the order:
    1. the latest complete checkpoint in `checkpointer`'s directory (state and `data_iterator`: exact continuation);
    2. `resume`: another run's checkpoint directory or step directory (full state; the input stream starts afresh);
    3. `init`: pretrained weights, `load_init(init_fn(), init)` (the caller loads them into the sharded state);
    4. scratch: `init_fn()`.
    `abstract_state` gives the structure, shapes and target shardings for 1 and 2. A `resume` or `init` path
    that does not exist is an error, as is a checkpoint that does not fit `abstract_state`.
    """
    step = checkpointer.latest_step()
    if step is not None:
        state = checkpointer.restore(step, abstract_state, data_iterator=data_iterator)
        logging.info("resumed from %s at step %d", checkpointer.directory, step)
        return StartState(state, step, "workdir", str(checkpointer.directory / str(step)))
    if resume:
        root, step = _resume_location(resume)
        other = checkpoint.Checkpointer(root, read_only=True)
        try:
            step = other.latest_step() if step is None else step
            if step is None or step not in other.all_steps():
                raise FileNotFoundError(f"config.resume={resume!r}: no complete checkpoint there "
                                        f"(steps: {other.all_steps()})")
            state = other.restore(step, abstract_state)
        finally:
            other.close()
        logging.info("started from config.resume=%s, step %d", resume, step)
        return StartState(state, step, "resume", str(root / str(step)))
    if init:
        if not epath.Path(init).exists():
            raise FileNotFoundError(f"config.init={init!r}: pretrained weights not found")
        if load_init is None:
            raise ValueError(f"config.init={init!r} is set but no weight loader was given")
        logging.info("initialising from pretrained weights %s", init)
        return StartState(load_init(init_fn(), init), 0, "init", init)
    logging.info("initialising from scratch")
    return StartState(init_fn(), 0, "scratch")


def start_state(config, trainer: Trainer, ckpt: checkpoint.Checkpointer, train_iter) -> StartState:
    """The state a training run starts from (the order of the module docstring), created or restored in its
    shards. A workdir checkpoint that does not fit the model is an error that also lists how the config it was
    written with differs from this one."""
    create = jax.jit(trainer.create_state, out_shardings=trainer.state_shardings)
    try:
        return restore_or_initialize(
            ckpt, abstract_state=trainer.abstract_state, init_fn=lambda: create(jax.random.key(config.seed)),
            data_iterator=train_iter, resume=config.resume, init=config.init,
            load_init=lambda state, path: load_pretrained(trainer, state, path))
    except checkpoint.CheckpointMismatchError as err:
        step = ckpt.latest_step()
        saved = ckpt.restore_config(step) if step is not None else None
        if saved is None:
            raise
        differences = "\n  ".join(config_differences(saved, config)[:20]) or "(none)"
        raise checkpoint.CheckpointMismatchError(
            f"{err}\nThe workdir's checkpoint {step} was written by a run whose config differs from this one in:\n  "
            f"{differences}\nUse another --workdir, or the config that wrote it.") from None


def config_differences(saved: dict, config) -> list[str]:
    """'key: checkpoint a, this run b' for every leaf that differs between a checkpoint's config and `config`."""
    def flat(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    old, new = flat(saved), flat(checkpoint.config_to_json(config))
    return [f"{k}: checkpoint {old.get(k, '(absent)')!r}, this run {new.get(k, '(absent)')!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def restore_step(trainer: Trainer, root: str, step: int | None = None) -> tuple[dict, int]:
    """(state, step) of checkpoint `step` (default: the latest) under `root`, restored into the trainer's shards."""
    ckpt = checkpoint.Checkpointer(root, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"{root}: no checkpoint for step {step} (steps: {ckpt.all_steps()})")
        with nn.logical_axis_rules(trainer.rules):
            return ckpt.restore(step, trainer.abstract_state), step
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------- pretrained weights


def _pretrained_params(config, task: Task) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
    """The model parameters that config.init (and model.text_encoder) provide, as host arrays, and which model
    parameters of those subtrees keep their initialisation (Task.pretrained_params)."""
    # The loaders unbox logically partitioned shapes outside jit, which under the run's mesh and axis rules would
    # apply sharding constraints to ShapeDtypeStructs (an error); host arrays need no rules.
    with nn.logical_axis_rules(()):
        _, unet = load_unet(config.init, on_host=True)
        _, vae = load_vae(config.init, on_host=True)
        text_encoder = None
        if task.uses_text_encoder():
            _, text_encoder = load_text_encoder(text_encoder_path(config), on_host=True)
    return task.pretrained_params(unet, vae, text_encoder)


def load_pretrained(trainer: Trainer, state: dict, path: str) -> dict:
    """Replace the parameters the pretrained files provide (UNet, VAE, CLIP; per task) in a freshly created
    state, placed directly into their shards, and rebuild the optimizer state (and EMA) from them."""
    config = trainer.config
    loaded, keeps_init = _pretrained_params(config, trainer.task)
    loaded = flatten_dict(loaded)
    params = flatten_dict(trainer.info.merge(state["params"], state["frozen"]))
    shardings = flatten_dict(trainer.info.merge(trainer.state_shardings["params"], trainer.state_shardings["frozen"]))
    missing = sorted("/".join(p) for p in params
                     if p[0] in {q[0] for q in loaded} and p not in loaded and not keeps_init(p))
    unexpected = sorted("/".join(p) for p in loaded if p not in params)
    mismatched = sorted(f"{'/'.join(p)}: {loaded[p].shape} vs model {params[p].shape}" for p in loaded
                        if p in params and loaded[p].shape != params[p].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"config.init={path!r} does not fit the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, mis-shaped {mismatched[:10]}")
    for p, value in loaded.items():
        params[p] = parallel.place(np.asarray(value, params[p].dtype), shardings[p])
    make_state = jax.jit(trainer.state_from_variables, out_shardings=trainer.state_shardings)
    return make_state(unflatten_dict(params), state["batch_stats"])
