"""The optimizer from `config.optim`: torch-style AdamW with parameter groups, lr schedules, optional gradient
clipping, gradient accumulation and an EMA of the parameters.

Per trainable parameter p in a group with multipliers (lr_mult, wd_mult) the update is torch.optim.AdamW's
    p <- p - lr(t) lr_mult (m_hat / (sqrt(v_hat) + eps) + weight_decay wd_mult p)
(decoupled decay scaled by the group's lr, as torch does with per-group lr and weight_decay; docs/reference.md,
"AdamW and parameter groups").

The optimizer works on the *trainable* parameters only: frozen ones (VAE, CLIP, LD-ZNet's SD UNet) get no
gradient and no state. Typical use in a train step:

    tx, info = make_optimizer(config.optim, params, total_steps)
    trainable, frozen = info.split(params)
    opt_state = tx.init(trainable)
    grads = jax.grad(lambda t: loss(info.merge(t, frozen), batch))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

`ema_params(opt_state)` gives the EMA of the trainable parameters for evaluation (when ema_decay > 0).
The optimizer state has the trainable tree's structure in every per-parameter slot (Adam moments, accumulated
gradients, EMA), so `jax.eval_shape(tx.init, boxed_trainable)` on logically-partitioned params gives the state's
logical axes (see `vpd_jax.parallel.logical_to_shardings`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.traverse_util import flatten_dict

from vpd_jax.run.param_groups import (PARAM_GROUPS, ParamGroup, ParamRule, assign_groups, describe_groups, group_trees,
                                  merge_params, resolve_rules, split_params, trainable_mask)
from vpd_jax.run.schedules import SCHEDULES, Schedule, lr_scaled_by_batch, make_schedule

__all__ = ["PARAM_GROUPS", "ParamRule", "ParamGroup", "PRESETS", "default_optim_config", "make_optimizer",
           "OptimizerInfo", "ema_params", "trainable_mask", "split_params", "merge_params", "lr_scaled_by_batch"]

# The optimizers of the tasks (vpd_jax.tasks: each Task names its optim_preset).
PRESETS = ("vpd_seg", "vpd_depth", "vpd_refer", "ldznet", "probe")

# LD-ZNet: base_learning_rate 5e-7 per sample (docs/reference.md, "LD-ZNet optimiser and learning rate"); the
# reference's GPU count is unknown, and 8 GPUs x 4 images (global batch 32) is our assumption (docs/fidelity.md).
LDZNET_LR_PER_SAMPLE = 5e-7
LDZNET_DEFAULT_GLOBAL_BATCH = 32

_SCHEDULE_DEFAULTS = dict(name="constant", warmup_steps=0, warmup_ratio=0.0, power=1.0, min_lr=0.0)
_OPTIM_FIELDS = {"lr", "weight_decay", "b1", "b2", "eps", "schedule", "param_groups", "clip_grad_norm",
                 "grad_accum_steps", "ema_decay", "ema_warmup"}


def _optim_config(lr: float, weight_decay: float, param_groups: str, schedule: Mapping[str, Any],
                  ema_decay: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=lr,
        weight_decay=weight_decay,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        schedule={**_SCHEDULE_DEFAULTS, **schedule},
        # A PARAM_GROUPS preset name (also from the command line), or a list of ParamRule field dicts (in a config
        # file); typed `object` so that either may replace the other in a locked config.
        param_groups=ml_collections.FieldReference(param_groups, field_type=object),
        clip_grad_norm=0.0,  # max global gradient norm; 0 = no clipping
        grad_accum_steps=1,  # micro-batches averaged per update (optax.MultiSteps); 1 = none
        ema_decay=ema_decay,  # EMA of the trainable params kept in the optimizer state; 0 = none
        ema_warmup=False,  # decay min(ema_decay, (1 + n) / (10 + n)) at update n (CompVis LitEma)
    ))


def default_optim_config(task: str, global_batch: int | None = None) -> ml_collections.ConfigDict:
    """The reference optimizer of `task` (one of PRESETS) as a `config.optim` section.

    Training lengths, which the train config holds and passes to `make_optimizer` as total_steps:
    vpd_seg 80,000 iterations at global batch 16; vpd_depth 25 epochs at 24, with steps_per_epoch for the ramp;
    vpd_refer 40 epochs at 32 (docs/reference.md, "Segmentation optimiser", "Depth optimiser", "Referring loss and
    optimiser"). LD-ZNet trains "until stopped" with an epoch-level ReduceLROnPlateau on the training loss; we replace
    that with a constant lr (a plateau rule needs the loss inside the optimizer and makes the run depend on its own
    noise), scaled by `global_batch` (default 32).
    """
    if task not in PRESETS:
        raise ValueError(f"unknown task {task!r} for default_optim_config; tasks: {list(PRESETS)}")
    if global_batch is not None and task != "ldznet":
        raise ValueError(f"{task}: the reference lr does not depend on the batch size; global_batch is for 'ldznet'")
    if task == "vpd_seg":  # docs/reference.md, "Segmentation optimiser"
        return _optim_config(8e-5, 1e-3, "vpd_seg",
                             dict(name="poly", power=1.0, min_lr=0.0, warmup_steps=1500, warmup_ratio=1e-6))
    if task == "vpd_depth":  # docs/reference.md, "Depth optimiser"
        return _optim_config(5e-4, 0.1, "vpd_depth", dict(name="vpd_depth_ramp", power=0.9, min_lr=3e-5))
    if task == "vpd_refer":  # docs/reference.md, "Referring loss and optimiser"
        return _optim_config(5e-5, 1e-2, "vpd_refer", dict(name="poly", power=0.9, min_lr=0.0))
    if task == "probe":  # our choice (no reference): Adam without decay at a constant lr, the decoders only
        return _optim_config(1e-3, 0.0, "probe", dict(name="constant"))
    # docs/reference.md, "LD-ZNet optimiser and learning rate", "LD-ZNet EMA"
    batch = LDZNET_DEFAULT_GLOBAL_BATCH if global_batch is None else global_batch
    return _optim_config(lr_scaled_by_batch(LDZNET_LR_PER_SAMPLE, batch), 1e-2, "ldznet", dict(name="constant"),
                         ema_decay=0.9999)


# ----------------------------------------------------------------------------------------- per-leaf transforms


def _check_tree(updates: Any, expected: Any, what: str) -> None:
    want, got = jax.tree.structure(expected), jax.tree.structure(updates)
    if got != want:
        raise ValueError(f"{what}: the optimizer was built for another parameter tree ({want.num_leaves} leaves, "
                         f"got {got.num_leaves}); pass the trainable params from OptimizerInfo.split")


def _scale_by_tree(lr_mults: Any) -> optax.GradientTransformation:
    """Multiply each update by its group's lr_mult (a tree of Python floats shaped like the trainable params)."""

    def update(updates, state, params=None):
        _check_tree(updates, lr_mults, "lr multipliers")
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, lr_mults), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _add_decayed_weights_by_tree(weight_decays: Any) -> optax.GradientTransformation:
    """Add wd * p to each update, wd being the parameter's weight_decay * wd_mult (a tree of Python floats)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: call tx.update(grads, opt_state, params)")
        _check_tree(updates, weight_decays, "weight decay")
        return jax.tree.map(lambda u, p, wd: u if wd == 0.0 else u + wd * p, updates, params, weight_decays), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class EmaState(NamedTuple):
    count: jax.Array  # updates so far
    params: Any  # EMA of the trainable params


def ema_of_params(decay: float, warmup: bool) -> optax.GradientTransformation:
    """Keeps an EMA of the params *after* each update; passes the updates through. Must be last in the chain."""

    def init(params):
        return EmaState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the parameter EMA needs the params: call tx.update(grads, opt_state, params)")
        count = state.count + 1
        rate = jnp.minimum(decay, (1.0 + count) / (10.0 + count)) if warmup else jnp.asarray(decay)
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: (rate * e + (1.0 - rate) * p).astype(e.dtype), state.params, new_params)
        return updates, EmaState(count, ema)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any | None:
    """The EMA of the trainable params held in `opt_state`, or None when the optimizer keeps none."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
             if isinstance(x, EmaState)]
    if len(found) > 1:
        raise ValueError(f"optimizer state holds {len(found)} parameter EMAs")
    return found[0].params if found else None


# ----------------------------------------------------------------------------------------------- make_optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """What `make_optimizer` decided, for the train step and the logs."""

    rules: tuple[ParamRule, ...]
    groups: dict[str, ParamGroup]  # '/'-joined path -> group, for every parameter
    mask: Any  # tree like params: True = trainable
    learning_rate: Schedule  # base lr (lr_mult 1) as a function of the optimizer update count
    grad_accum_steps: int

    def split(self, params: Any) -> tuple[dict, dict]:
        """(trainable, frozen) parameter trees."""
        return split_params(params, self.mask)

    def merge(self, trainable: Any, frozen: Any) -> dict:
        return merge_params(trainable, frozen)

    def lr_at_step(self, step: Any) -> Any:
        """Base lr used by the update made at (0-based) train step `step`, counting micro-batches."""
        return self.learning_rate(jnp.asarray(step) // self.grad_accum_steps)

    def summary(self, params: Any = None) -> str:
        return describe_groups(self.groups, params)


def _check_fields(cfg: Mapping[str, Any]) -> None:
    keys = set(cfg.keys())
    missing, unknown = sorted(_OPTIM_FIELDS - keys), sorted(keys - _OPTIM_FIELDS)
    if missing or unknown:
        raise ValueError(f"config.optim: missing fields {missing}, unknown fields {unknown} "
                         "(start from default_optim_config(task))")
    schedule_keys = set(cfg["schedule"].keys())
    if schedule_keys != set(_SCHEDULE_DEFAULTS):
        raise ValueError(f"config.optim.schedule: fields {sorted(schedule_keys)}, expected "
                         f"{sorted(_SCHEDULE_DEFAULTS)} (schedules: {list(SCHEDULES)})")


def make_optimizer(optim_config: Mapping[str, Any], params: Any, total_steps: int,
                   steps_per_epoch: int | None = None) -> tuple[optax.GradientTransformation, OptimizerInfo]:
    """The optax transform for the trainable part of `params` (arrays, ShapeDtypeStructs or boxed), and its info.

    total_steps counts optimizer updates (train steps / grad_accum_steps); steps_per_epoch (in updates) is needed
    by the epoch-based 'vpd_depth_ramp' schedule.
    """
    cfg = optim_config
    _check_fields(cfg)
    schedule = make_schedule(cfg["schedule"], cfg["lr"], total_steps, steps_per_epoch)
    rules = resolve_rules(cfg["param_groups"])
    groups = assign_groups(params, rules)
    mask = trainable_mask(params, rules)
    trainable, _ = split_params(params, mask)
    if not trainable:
        raise ValueError(f"param_groups {cfg['param_groups']!r} freeze every parameter")
    lr_mults, wd_mults = group_trees(groups, flatten_dict(trainable))
    weight_decays = jax.tree.map(lambda m: cfg["weight_decay"] * m, wd_mults)

    chain = []
    if cfg["clip_grad_norm"] > 0:
        chain.append(optax.clip_by_global_norm(cfg["clip_grad_norm"]))
    chain += [
        optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"]),
        _add_decayed_weights_by_tree(weight_decays),
        optax.scale_by_learning_rate(schedule),
        _scale_by_tree(lr_mults),
    ]
    if cfg["ema_decay"] > 0:
        chain.append(ema_of_params(cfg["ema_decay"], cfg["ema_warmup"]))
    tx = optax.chain(*chain)
    accum = int(cfg["grad_accum_steps"])
    if accum < 1:
        raise ValueError(f"config.optim.grad_accum_steps must be >= 1, got {accum}")
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx, OptimizerInfo(rules, groups, mask, schedule, accum)
