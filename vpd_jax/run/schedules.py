"""Learning-rate schedules of the reference trainings, as functions of the optimizer update count.

`count` is optax's update counter: 0 for the first update. Where a reference numbers its steps differently the
schedule says so (the depth ramp's step s starts at 1). Each function returns the *base* lr; parameter groups
multiply it by their lr_mult (mmcv and the depth trainer both scale the whole per-group value, which is the same
as long as min_lr is 0; with min_lr > 0 mmcv would floor every group at the same absolute min_lr).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp

Schedule = Callable[[Any], Any]


def linear_warmup(schedule: Schedule, warmup_steps: int, warmup_ratio: float) -> Schedule:
    """mmcv's linear warmup: for count < warmup_steps the regular value is multiplied by
    1 - (1 - count / warmup_steps)(1 - warmup_ratio), i.e. it rises linearly from warmup_ratio to 1."""
    if warmup_steps <= 0:
        return schedule

    def fn(count):
        count = jnp.asarray(count, jnp.float32)
        # = 1 - (1 - count / warmup)(1 - ratio), written without the float32 cancellation near count 0
        factor = warmup_ratio + (1.0 - warmup_ratio) * count / warmup_steps
        return schedule(count) * jnp.where(count < warmup_steps, factor, 1.0)

    return fn


def constant(lr: float) -> Schedule:
    return lambda count: jnp.full(jnp.shape(count), lr, jnp.float32)


def poly(lr: float, total_steps: int, power: float, min_lr: float = 0.0) -> Schedule:
    """mmcv PolyLrUpdaterHook (by iteration): (lr - min_lr)(1 - count/total)^power + min_lr; min_lr after the end."""

    def fn(count):
        # (total - count) / total, not 1 - count / total: exact in float32 near the end of training
        remaining = jnp.maximum(total_steps - jnp.asarray(count, jnp.float32), 0.0) / total_steps
        return (lr - min_lr) * remaining ** power + min_lr

    return fn


def cosine(lr: float, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Half-cosine from lr at count 0 to min_lr at total_steps (min_lr after the end)."""

    def fn(count):
        progress = jnp.minimum(jnp.asarray(count, jnp.float32), total_steps) / total_steps
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))

    return fn


def vpd_depth_ramp(lr: float, min_lr: float, total_steps: int, steps_per_epoch: int, power: float = 0.9) -> Schedule:
    """The VPD depth schedule (docs/reference.md, "Depth optimiser"), with s = count + 1 (the reference's global step
    starts at 1):
    H = steps_per_epoch * (epochs // 2);
    s < H: (lr - min_lr)(s/H)^power + min_lr;  s >= H: max(min_lr, lr - (lr - min_lr)(s/H - 1)^power).
    """
    if total_steps % steps_per_epoch:
        raise ValueError(f"vpd_depth_ramp: total_steps {total_steps} is not a whole number of epochs of "
                         f"{steps_per_epoch} steps")
    half = steps_per_epoch * ((total_steps // steps_per_epoch) // 2)
    if half <= 0:
        raise ValueError(f"vpd_depth_ramp: needs at least 2 epochs, got {total_steps // steps_per_epoch}")

    def fn(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        up = (lr - min_lr) * (jnp.minimum(s, half) / half) ** power + min_lr
        down = jnp.maximum(min_lr, lr - (lr - min_lr) * (jnp.maximum(s - half, 0.0) / half) ** power)
        return jnp.where(s < half, up, down)

    return fn


SCHEDULES = ("constant", "poly", "cosine", "vpd_depth_ramp")


def make_schedule(cfg: Mapping[str, Any], lr: float, total_steps: int,
                  steps_per_epoch: int | None = None) -> Schedule:
    """The schedule named by cfg['name'] with base lr `lr`, wrapped in mmcv linear warmup when warmup_steps > 0.

    Fields: name, warmup_steps, warmup_ratio, power (poly, vpd_depth_ramp), min_lr (poly, cosine, vpd_depth_ramp).
    """
    name = cfg["name"]
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; schedules: {list(SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"lr schedule {name!r}: total_steps must be > 0, got {total_steps}")
    if name == "constant":
        base = constant(lr)
    elif name == "poly":
        base = poly(lr, total_steps, cfg["power"], cfg["min_lr"])
    elif name == "cosine":
        base = cosine(lr, total_steps, cfg["min_lr"])
    else:
        if not steps_per_epoch:
            raise ValueError("lr schedule 'vpd_depth_ramp' ramps over half the epochs: pass steps_per_epoch")
        base = vpd_depth_ramp(lr, cfg["min_lr"], total_steps, steps_per_epoch, cfg["power"])
    return linear_warmup(base, int(cfg["warmup_steps"]), float(cfg["warmup_ratio"]))


def lr_scaled_by_batch(lr_per_sample: float, global_batch: int) -> float:
    """lr = global batch x lr per sample: the CompVis `--scale_lr` rule LD-ZNet trains with
    (accumulate_grad_batches x n_gpus x batch_size x base_lr, base_lr 5e-7; docs/reference.md, "LD-ZNet optimiser and
    learning rate")."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    return lr_per_sample * global_batch
