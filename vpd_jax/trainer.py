"""The pieces of a run shared by training and evaluation: architecture, per-host data config, the sharded
train state (created, restored or loaded from pretrained weights directly into its shards) and the jitted step.

The train state is a dict: step, params (trainable), frozen (VAE, CLIP), batch_stats, opt_state, and the
count / first step of non-finite updates (which are never applied, see config.nonfinite). Steps are counted as
the logs count them: train step s is the s-th update, the one that turns state step s - 1 into s.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec as P

from vpd_jax import optim, parallel, tasks
from vpd_jax.models import presets
from vpd_jax.weights import load_text_encoder, load_unet, load_vae

# ------------------------------------------------------------------------------------------- configuration


def sharding_rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in config.sharding_rules)


def resolve_architecture(config) -> presets.Architecture:
    """The preset named by config.model.arch, or (arch 'init') the architecture of the config.init files."""
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
    if "text_encoder" in tasks.TASKS[config.task].frozen_subtrees:
        text, _ = load_text_encoder(_text_encoder_path(config), on_host=True)
        text = text.config
    return presets.Architecture(unet.config, vae.config, text)


def _text_encoder_path(config) -> str:
    return config.model.text_encoder or config.init


def host_data_config(config, process_count: int) -> ml_collections.ConfigDict:
    """config.data with the per-host batch sizes derived from the global ones."""
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % process_count:
            raise ValueError(f"config.{name}={config[name]} is not divisible by the {process_count} processes")
    data = copy.deepcopy(config.data)
    data.unlock()
    data.batch_size_per_host = config.batch_size // process_count
    data.eval_batch_size_per_host = config.eval_batch_size // process_count
    data.lock()
    return data


def example_batch(dataset, data) -> dict[str, np.ndarray]:
    """A one-example batch of zeros with the pipeline's keys, shapes and dtypes (text -> tokens)."""
    batch = {}
    for key, spec in dataset.element_spec.items():
        if key == "text":
            batch["tokens"] = np.zeros((1, data.text_max_length), np.int32)
        elif spec.dtype.is_numpy_compatible and spec.dtype.name != "string":
            batch[key] = np.zeros((1, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
    return batch


def device_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Per-host numpy batch -> global arrays sharded over the batch axis (strings stay on the host)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
            if np.asarray(v).dtype.kind in "biuf"}


# ------------------------------------------------------------------------------------------------ the state


def initial_state(tx: optax.GradientTransformation, info: optim.OptimizerInfo, params: dict,
                  batch_stats: dict) -> dict:
    """The train state at step 0 for the model variables `params` / `batch_stats`."""
    trainable, frozen = info.split(params)
    return dict(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, batch_stats=batch_stats,
                opt_state=tx.init(trainable), nonfinite=jnp.zeros((), jnp.int32),
                first_nonfinite_step=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything the step functions close over (built by `build_trainer`)."""

    config: ml_collections.ConfigDict
    task: tasks.Task
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    info: optim.OptimizerInfo
    example: dict
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    replicated: NamedSharding

    def create_state(self, rng: jax.Array) -> dict:
        variables = nn.meta.unbox(self.task.init_variables(rng, self.example, self.task.constants))
        return self.state_from_variables(variables["params"], variables.get("batch_stats", {}))

    def state_from_variables(self, params: dict, batch_stats: dict) -> dict:
        return initial_state(self.tx, self.info, params, batch_stats)

    def variables(self, state: dict, use_ema: bool = False) -> dict:
        params = state["params"]
        if use_ema:
            params = optim.ema_params(state["opt_state"]) or params
        return {"params": self.info.merge(params, state["frozen"]), "batch_stats": state["batch_stats"]}

    def train_step(self, state: dict, batch: dict, constants: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.key(self.config.seed), step)

        def loss_fn(trainable):
            variables = {"params": self.info.merge(trainable, state["frozen"]), "batch_stats": state["batch_stats"]}
            output, new_stats = self.task.apply(variables, batch, constants, train=True, rng=rng)
            return self.task.loss(output, batch), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        lr = self.info.lr_at_step(step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
        (params, opt_state), finite = self._guarded_update(grads, state, finite)
        batch_stats = state["batch_stats"]
        if new_stats is not None:
            batch_stats = _keep_if(finite, new_stats, batch_stats)

        first_bad = state["nonfinite"] == 0
        new_state = dict(
            step=step + 1,
            params=params,
            frozen=state["frozen"],
            batch_stats=batch_stats,
            opt_state=opt_state,
            nonfinite=state["nonfinite"] + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(~finite & first_bad, step + 1, state["first_nonfinite_step"]),
        )
        metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(new_state["params"]),
                       lr=lr)
        return new_state, metrics

    def _guarded_update(self, grads, state: dict, finite: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
        """(params, opt_state) after the optimizer update, or as they were when the step is not finite.

        nonfinite_check 'gradients': `finite` (loss, gradient norm and learning rate) decides before the update,
        which is then computed in place under a lax.cond. With finite gradients, finite hyper-parameters and
        eps > 0 (build_trainer insists), AdamW's update is finite too. 'updates' also checks the update itself,
        which must then be complete before the old state may be overwritten: new and old moments and parameters
        live side by side (the VPD-seg step at SD1.5 size, batch 1: 3 GiB more, about one copy of the trainable
        parameters; `python -m bench.run --full` measures it).
        """
        def update(params, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), updates

        old = (state["params"], state["opt_state"])
        if self.config.nonfinite_check == "updates":
            new, updates = update(*old)
            finite = finite & jnp.isfinite(optax.tree.norm(updates))
            return _keep_if(finite, new, old), finite
        return jax.lax.cond(finite, lambda p, o: update(p, o)[0], lambda p, o: (p, o), *old), finite

    def jit_train_step(self):
        constants_sharding = jax.tree.map(lambda _: self.replicated, self.task.constants)
        return jax.jit(self.train_step, donate_argnums=(0,),
                       in_shardings=(self.state_shardings, self.batch_sharding, constants_sharding),
                       out_shardings=(self.state_shardings, self.replicated))


def _keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


NONFINITE_CHECKS = ("gradients", "updates")


def check_nonfinite_guard(config) -> None:
    """config.nonfinite_check is known, and 'gradients' (which trusts a finite gradient to give a finite update)
    is not combined with eps = 0, where a zero gradient makes AdamW's update 0 / 0."""
    if config.nonfinite_check not in NONFINITE_CHECKS:
        raise ValueError(f"config.nonfinite_check={config.nonfinite_check!r}; use one of {NONFINITE_CHECKS}")
    if config.nonfinite_check == "gradients" and not config.optim.eps > 0:
        raise ValueError(f"config.optim.eps={config.optim.eps} with config.nonfinite_check='gradients': a zero "
                         "gradient gives AdamW a 0/0 update that only nonfinite_check='updates' catches; use eps > 0 "
                         "or that check")


def build_trainer(config, task: tasks.Task, mesh, data, dataset) -> Trainer:
    """The Trainer of `config` on `mesh`; `dataset` (anything with the pipeline's `element_spec`) gives the
    model's example inputs."""
    check_nonfinite_guard(config)
    rules = sharding_rules(config)
    example = example_batch(dataset, data)
    total_updates = config.total_steps // config.optim.grad_accum_steps
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda rng: task.init_variables(rng, example, task.constants), jax.random.key(0))
    tx, info = optim.make_optimizer(config.optim, boxed["params"], total_updates,
                                    steps_per_epoch=config.steps_per_epoch or None)
    # The variables are arguments, not closed over: an optimizer init that copies arrays (the EMA) needs tracers.
    boxed_state = jax.eval_shape(lambda params, stats: initial_state(tx, info, params, stats), boxed["params"],
                                 boxed.get("batch_stats", {}))
    state_shardings = parallel.logical_to_shardings(boxed_state, mesh, rules)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  nn.meta.unbox(boxed_state), state_shardings)
    logging.info("parameter groups:\n%s", info.summary(nn.meta.unbox(boxed["params"])))
    return Trainer(config, task, mesh, rules, tx, info, example, state_shardings, abstract_state,
                   batch_sharding=NamedSharding(mesh, P(("data", "fsdp"))), replicated=NamedSharding(mesh, P()))


def _place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array into its shards (each device gets only its slice)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _pretrained_params(config, task: tasks.Task) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
    """The model parameters that config.init (and model.text_encoder) provide, as host arrays, and which model
    parameters of those subtrees keep their initialisation (Task.pretrained_params)."""
    # The loaders unbox logically partitioned shapes outside jit, which under the run's mesh and axis rules would
    # apply sharding constraints to ShapeDtypeStructs (an error); host arrays need no rules.
    with nn.logical_axis_rules(()):
        _, unet = load_unet(config.init, on_host=True)
        _, vae = load_vae(config.init, on_host=True)
        text_encoder = None
        if "text_encoder" in task.frozen_subtrees:
            _, text_encoder = load_text_encoder(_text_encoder_path(config), on_host=True)
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
        params[p] = _place(np.asarray(value, params[p].dtype), shardings[p])
    make_state = jax.jit(trainer.state_from_variables, out_shardings=trainer.state_shardings)
    return make_state(unflatten_dict(params), state["batch_stats"])


