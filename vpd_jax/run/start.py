"""Where a run's state comes from, in one place. In order (`start_state`):

  1. this workdir's latest complete checkpoint: state and data iterator, an exact continuation;
  2. `config.resume`: another run's checkpoint directory or step directory (full state; the input starts afresh);
  3. `config.init`: pretrained Stable Diffusion weights, in a fresh state whose other parameters are drawn
     (`pretrained_state`);
  4. scratch.

Evaluation and predictions restore one step of a run (`restore_step`). Every state is created or restored directly
in its shards.

Before anything is built or written, a training run checks that it can start from there (training.py calls these in
this order):
  `workdir_checkpoint` + `check_resume`   the workdir's checkpoint continues one data stream: a run whose data,
                                          batch size or number of processes differ from the checkpoint's config is
                                          refused by name (RESUME_REFUSED); other differences are logged
                                          (`log_resume_differences`: schedule and the rest as warnings, the mesh
                                          as information, since the state is resharded on restore);
  `check_checkpoint_fits`                 its state has the model's keys and shapes (metadata only); likewise
  `check_resume_source_fits`              for config.resume's checkpoint;
  `read_pretrained`                       config.init's weights fit the model (read once, then placed by
                                          `pretrained_state`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax import parallel
from vpd_jax.run import checkpoint
from vpd_jax.run.init_rng import init_key
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


def _resume_step(other: checkpoint.Checkpointer, resume: str, step: int | None) -> int:
    """`step` (default: the latest) of config.resume's checkpoints, which must be complete."""
    step = other.latest_step() if step is None else step
    if step is None or step not in other.all_steps():
        raise FileNotFoundError(f"config.resume={resume!r}: no complete checkpoint there (steps: {other.all_steps()})")
    return step


def restore_or_initialize(
    checkpointer: checkpoint.Checkpointer,
    *,
    abstract_state: Any,
    init_fn: Callable[[], Any],
    data_iterator: Any = None,
    resume: str | None = None,
    init: str | None = None,
    load_init: Callable[[str], Any] | None = None,
) -> StartState:
    """The state to start from, in the order:
    1. the latest complete checkpoint in `checkpointer`'s directory (state and `data_iterator`: exact continuation);
    2. `resume`: another run's checkpoint directory or step directory (full state; the input stream starts afresh);
    3. `init`: pretrained weights, `load_init(init)` (the caller builds the sharded state around them);
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
        with checkpoint.Checkpointer(root, read_only=True) as other:
            step = _resume_step(other, resume, step)
            state = other.restore(step, abstract_state)
        logging.info("started from config.resume=%s, step %d", resume, step)
        return StartState(state, step, "resume", str(root / str(step)))
    if init:
        if not epath.Path(init).exists():
            raise FileNotFoundError(f"config.init={init!r}: pretrained weights not found")
        if load_init is None:
            raise ValueError(f"config.init={init!r} is set but no weight loader was given")
        logging.info("initialising from pretrained weights %s", init)
        return StartState(load_init(init), 0, "init", init)
    logging.info("initialising from scratch")
    return StartState(init_fn(), 0, "scratch")


def start_state(config, trainer: Trainer, ckpt: checkpoint.Checkpointer, train_iter,
                pretrained: dict | None = None) -> StartState:
    """The state a training run starts from (the order of the module docstring), created or restored in its
    shards; `pretrained`: config.init's weights as `read_pretrained` gave them (read here when not given). A
    workdir checkpoint that does not fit the model is an error that also lists how the config it was written with
    differs from this one."""
    create = jax.jit(trainer.create_state, out_shardings=trainer.state_shardings)
    rng = init_key(config.seed, config.init_rng)
    try:
        return restore_or_initialize(
            ckpt, abstract_state=trainer.abstract_state, init_fn=lambda: create(rng), data_iterator=train_iter,
            resume=config.resume, init=config.init,
            load_init=lambda path: pretrained_state(trainer, rng, path, pretrained))
    except checkpoint.CheckpointMismatchError as err:
        step = ckpt.latest_step()
        saved = ckpt.restore_config(step) if step is not None else None
        if saved is None:
            raise
        raise _mismatch_with_differences(err, ckpt.directory / str(step), saved, config) from None


def _mismatch_with_differences(err: Exception, where, saved: dict, config) -> checkpoint.CheckpointMismatchError:
    differences = "\n  ".join(config_differences(saved, config)[:20]) or "(none)"
    return checkpoint.CheckpointMismatchError(
        f"{err}\nThe workdir's checkpoint {where} was written by a run whose config differs from this one in:\n  "
        f"{differences}\nUse another --workdir, or the config that wrote it.")


def _flat_config(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat_config(value, f"{prefix}{key}.").items()}


_ABSENT = "(absent)"


def differing_keys(saved: dict, config) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's config (JSON) and `config`."""
    old, new = _flat_config(saved), _flat_config(checkpoint.config_to_json(config))
    return [k for k in sorted(old.keys() | new.keys()) if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def config_differences(saved: dict, config, keys: list[str] | None = None) -> list[str]:
    """'key: checkpoint a, this run b' for every leaf that differs between a checkpoint's config and `config`
    (or for `keys`)."""
    old, new = _flat_config(saved), _flat_config(checkpoint.config_to_json(config))
    keys = differing_keys(saved, config) if keys is None else keys
    return [f"{k}: checkpoint {old.get(k, _ABSENT)!r}, this run {new.get(k, _ABSENT)!r}" for k in keys]


# ------------------------------------------------------------------------------ checks before anything is built

# How a run that resumes its workdir's checkpoint may differ from the run that wrote it, by dotted config key (a key
# or one of its parents). The restored input iterator continues one data stream: what it reads, how it batches and
# augments, and its per-process split cannot change under it.
RESUME_REFUSED = ("task", "batch_size", "data")
# ... except where the same data is read from, and what only evaluation reads (its pipeline starts afresh).
RESUME_ALLOWED_DATA = ("data.data_dir", "data.manual_dir", "data.eval_split", "data.eval_batch_size_per_host",
                       "data.seg_eval_pad_multiple")
# The state is restored into the new mesh's shardings.
RESUME_RESHARDED = ("mesh", "sharding_rules")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclasses.dataclass(frozen=True)
class WorkdirCheckpoint:
    """The latest complete checkpoint of a workdir, as found before the run builds anything."""

    directory: str  # the step directory
    step: int
    config: dict | None  # the config it was written with (None: saved without one)
    processes: list[str]  # whose data iterators it holds ('process_0', ...)


def workdir_checkpoint(root: str) -> WorkdirCheckpoint | None:
    """The latest complete checkpoint under `root` (a workdir's checkpoints/), or None; creates, cleans up and
    writes nothing."""
    if not epath.Path(root).exists():
        return None
    with checkpoint.Checkpointer(root, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            return None
        return WorkdirCheckpoint(str(ckpt.directory / str(step)), step, ckpt.restore_config(step),
                                 ckpt.data_processes(step))


def check_resume(found: WorkdirCheckpoint, config, process_count: int) -> None:
    """Refuses, naming the fields, to continue `found` with a config whose data stream differs (RESUME_REFUSED), or
    on another number of processes; says how to start a new workdir instead."""
    if set(found.processes) != {f"process_{i}" for i in range(process_count)}:
        raise ValueError(
            f"the workdir's checkpoint {found.directory} holds the input iterators of {len(found.processes)} "
            f"process(es) ({', '.join(found.processes) or 'none'}) and this run has {process_count}: its input "
            f"stream cannot be continued here. {_new_workdir_hint(found)}")
    if found.config is None:
        logging.warning("the workdir's checkpoint %s was saved without its config: the new config cannot be "
                        "compared with it", found.directory)
        return
    refused = [k for k in differing_keys(found.config, config)
               if _under(k, RESUME_REFUSED) and not _under(k, RESUME_ALLOWED_DATA)]
    if refused:
        raise ValueError(
            f"the workdir's checkpoint {found.directory} continues a data stream that this config changes:\n  "
            + "\n  ".join(config_differences(found.config, config, refused))
            + f"\nA resumed run reads on where its input stream stopped, so these fields must keep the checkpoint's "
              f"values. {_new_workdir_hint(found)}")


def _new_workdir_hint(found: WorkdirCheckpoint) -> str:
    return (f"To train with this config, use a new --workdir (with --config.resume={found.directory} to start from "
            f"this checkpoint's state and a fresh input stream).")


def check_checkpoint_fits(found: WorkdirCheckpoint, trainer: Trainer, config) -> None:
    """Refuses a workdir checkpoint whose state does not have the model's keys and shapes (reading only its
    metadata), listing the config differences that explain it."""
    root, step = os.path.dirname(found.directory), found.step
    with checkpoint.Checkpointer(root, read_only=True) as ckpt:
        try:
            ckpt.check_fits(step, trainer.abstract_state)
        except checkpoint.CheckpointMismatchError as err:
            if found.config is None:
                raise
            raise _mismatch_with_differences(err, found.directory, found.config, config) from None


def log_resume_differences(found: WorkdirCheckpoint, config) -> None:
    """Logs how `config` differs from the config of the checkpoint it resumes: the mesh and sharding rules as
    information (the state is resharded on restore), the rest (schedule, evaluation, ...) as a warning."""
    if found.config is None:
        return
    keys = differing_keys(found.config, config)
    layout = [k for k in keys if _under(k, RESUME_RESHARDED)]
    others = [k for k in keys if k not in layout]
    if layout:
        logging.info("resuming %s on another layout (the state is resharded on restore):\n  %s", found.directory,
                     "\n  ".join(config_differences(found.config, config, layout)))
    if others:
        logging.warning("resuming %s with a config that differs from the checkpoint's in:\n  %s", found.directory,
                        "\n  ".join(config_differences(found.config, config, others)))
    if config.total_steps <= found.step:
        logging.warning("config.total_steps=%d and the workdir's checkpoint is at step %d: nothing to train, the run "
                        "only evaluates", config.total_steps, found.step)


def check_resume_source_fits(config, trainer: Trainer) -> None:
    """config.resume's checkpoint has the model's keys and shapes (metadata only)."""
    root, step = _resume_location(config.resume)
    with checkpoint.Checkpointer(root, read_only=True) as other:
        other.check_fits(_resume_step(other, config.resume, step), trainer.abstract_state)


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
        # A CompVis training checkpoint holds a UNet and its EMA copy: LD-ZNet's model.compvis_unet picks one.
        _, unet = load_unet(config.init, on_host=True, compvis_unet=config.model.get("compvis_unet", "model"))
        _, vae = load_vae(config.init, on_host=True)
        text_encoder = None
        if task.uses_text_encoder():
            _, text_encoder = load_text_encoder(text_encoder_path(config), on_host=True)
    return task.pretrained_params(unet, vae, text_encoder)


def read_pretrained(trainer: Trainer, path: str) -> dict:
    """config.init's weights for the trainer's model: flattened host arrays, checked against the model's
    parameter shapes (no state needs to exist yet), so that a mismatch shows before the pipeline and the state
    are built."""
    config = trainer.config
    loaded, keeps_init = _pretrained_params(config, trainer.task)
    loaded = flatten_dict(loaded)
    abstract = trainer.abstract_state
    params = flatten_dict(trainer.info.merge(abstract["params"], abstract["frozen"]))
    missing = sorted("/".join(p) for p in params
                     if p[0] in {q[0] for q in loaded} and p not in loaded and not keeps_init(p))
    unexpected = sorted("/".join(p) for p in loaded if p not in params)
    mismatched = sorted(f"{'/'.join(p)}: {loaded[p].shape} vs model {params[p].shape}" for p in loaded
                        if p in params and tuple(loaded[p].shape) != tuple(params[p].shape))
    if missing or unexpected or mismatched:
        raise ValueError(f"config.init={path!r} does not fit the model (config.model.arch={config.model.arch!r}): "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}, mis-shaped {mismatched[:10]}")
    return loaded


def pretrained_state(trainer: Trainer, rng: jax.Array, path: str, loaded: dict | None = None) -> dict:
    """A fresh train state whose parameters that the pretrained files provide (UNet, VAE, CLIP; per task) hold the
    files' values, placed directly into their shards, and whose other parameters and batch statistics are those a
    scratch start with `rng` gives them (trainer.create_state); the optimizer state (and EMA) is built from these.

    The initialiser compiles and runs for the drawn parameters only: it returns nothing else, so XLA drops the draws
    the files replace (for an SD-sized UNet, most of the initialiser's compile time and a second copy of the train
    state in memory). `loaded`: `read_pretrained(trainer, path)`, read here when not given."""
    loaded = read_pretrained(trainer, path) if loaded is None else loaded
    abstract = flatten_dict(trainer.info.merge(trainer.abstract_state["params"], trainer.abstract_state["frozen"]))
    shardings = flatten_dict(trainer.info.merge(trainer.state_shardings["params"], trainer.state_shardings["frozen"]))
    drawn_paths = [p for p in abstract if p not in loaded]

    def draw(rng):
        variables = trainer.initial_variables(rng)
        params = flatten_dict(variables["params"])
        return [params[p] for p in drawn_paths], variables.get("batch_stats", {})

    drawn, batch_stats = jax.jit(draw, out_shardings=([shardings[p] for p in drawn_paths],
                                                      trainer.state_shardings["batch_stats"]))(rng)
    params = dict(zip(drawn_paths, drawn))
    for p, value in loaded.items():
        params[p] = parallel.place(np.asarray(value, abstract[p].dtype), shardings[p])
    make_state = jax.jit(trainer.state_from_variables, out_shardings=trainer.state_shardings)
    return make_state(unflatten_dict(params), batch_stats)
