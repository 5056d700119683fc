"""Trainer.train_step by value: two steps of a small segmentation task against the same steps written out here.

What the hand-written step does (vpd_jax/run/optim.py and trainer.py describe the same from their side): the
dropout key of train step s is fold_in(key(config.seed), s); the loss is the task's on the model's train-mode output
with the frozen VAE merged in; BatchNorm's running statistics come from that forward; and torch's AdamW updates
each trainable parameter p of a group (lr_mult, wd_mult) with the step's base learning rate lr(s) (docs/reference.md,
"AdamW and parameter groups"), here in numpy:
    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,  m^ = m / (1 - b1^t),  v^ = v / (1 - b2^t)
    p <- p - lr(s) lr_mult (m^ / (sqrt(v^) + eps) + weight_decay wd_mult p)
The group multipliers are the trainer's own (tests/run/test_train.py checks them against the reference rules).

The two computations are separate XLA programs, which fuse and round their float32 sums differently: the loss,
BatchNorm statistics and Adam moments agree to float32 rounding, not bit for bit, and each parameter update is held
to what the rounding error of its gradient allows (see test_train_step_is_the_hand_written_adamw_step).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from tests.helpers.variables import random_trainer_variables
from tests.test_configs import get_config
from vpd_jax import losses, parallel
from vpd_jax.models import convolution, presets
from vpd_jax.parallel import device_batch
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.registry import make_task

STEPS = 2
TOTAL_STEPS = 4
LR, POWER = 1e-3, 1.0  # poly(1.0) without warm-up: lr(s) = LR (1 - s / TOTAL_STEPS), 1e-3 and 7.5e-4 here
SEED = 7


def small_architecture() -> presets.Architecture:
    """The tiny preset with cross-attention in the first down and last up block only: every kind of parameter
    group of the seg preset, and a train step that compiles in half the time."""
    tiny = presets.architecture("tiny")
    unet = dataclasses.replace(tiny.unet, down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
                               up_block_types=("UpBlock2D",) * 3 + ("CrossAttnUpBlock2D",))
    return presets.Architecture(unet, tiny.vae, tiny.text)


def seg_batch(num_classes: int, rng: np.random.Generator) -> dict:
    """Two 64 px images in [-1, 1] and label maps with some ignored (255) pixels."""
    labels = rng.integers(0, num_classes, (2, 64, 64)).astype(np.int32)
    labels[:, :5] = 255
    return {"image": rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32), "label": labels}


@pytest.fixture(scope="module")
def seg_run():
    """The seg smoke config (dropout 0.1, BatchNorm in the FPN head) on one device, host-random variables, and
    two batches."""
    config = get_config("vpd_seg_ade20k.py", "smoke")
    config.seed = SEED
    config.total_steps = TOTAL_STEPS
    config.optim.lr = LR
    config.optim.weight_decay = 0.1  # the decay term (lr wd p) well above the tolerance of the comparison below
    config.optim.schedule.name, config.optim.schedule.power, config.optim.schedule.warmup_steps = "poly", POWER, 0
    task = make_task(config, small_architecture())
    assert task.model.dropout_ratio > 0
    trainer = build_trainer(config, task, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    batches = [seg_batch(task.num_classes, rng) for _ in range(STEPS)]
    return config, task, trainer, random_trainer_variables(trainer, seed=5), batches


def hand_written_steps(config, task, groups, variables: dict, batches: list[dict]) -> dict:
    """STEPS train steps as the module docstring writes them: {params, batch_stats, mu, nu (flat dicts of the
    trainable parameters), losses, lrs}."""
    o = config.optim
    frozen = {"vae": variables["params"]["vae"]}
    embeddings = jnp.asarray(task.constants["class_embeddings"])

    @jax.jit
    def loss_and_gradients(trainable, batch_stats, batch, rng):
        def loss_fn(trainable):
            logits, updates = task.model.apply(
                {"params": {**trainable, **frozen}, "batch_stats": batch_stats}, batch["image"], embeddings,
                train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return losses.segmentation_loss(logits, batch["label"]), updates["batch_stats"]
        return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

    trainable = {k: v for k, v in variables["params"].items() if k != "vae"}
    batch_stats = variables["batch_stats"]
    params = {path: np.asarray(p) for path, p in flatten_dict(trainable).items()}
    mu = {path: np.zeros_like(p) for path, p in params.items()}
    nu = {path: np.zeros_like(p) for path, p in params.items()}
    step_losses, lrs = [], []
    for s, batch in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(config.seed), s)
        # The trainer's programs run under a mesh, where compute.conv 'auto' is XLA's convolution; traced without
        # one, 'auto' would take the matrix form for 1x1 convolutions on the CPU and round differently.
        with convolution.implementation_context("xla"):
            (loss, batch_stats), grads = loss_and_gradients(trainable, batch_stats, batch, rng)
        lr, t = LR * (1.0 - s / TOTAL_STEPS) ** POWER, s + 1
        for path, g in flatten_dict(jax.device_get(grads)).items():
            group = groups["/".join(path)]
            mu[path] = o.b1 * mu[path] + (1 - o.b1) * g
            nu[path] = o.b2 * nu[path] + (1 - o.b2) * g * g
            m_hat, v_hat = mu[path] / (1 - o.b1 ** t), nu[path] / (1 - o.b2 ** t)
            params[path] = params[path] - lr * group.lr_mult * (
                m_hat / (np.sqrt(v_hat) + o.eps) + o.weight_decay * group.wd_mult * params[path])
        trainable = jax.tree_util.tree_map_with_path(
            lambda path, _: params[tuple(k.key for k in path)], trainable)
        step_losses.append(float(loss))
        lrs.append(lr)
    return dict(params=params, batch_stats=jax.device_get(batch_stats), mu=mu, nu=nu, losses=step_losses, lrs=lrs)


def _assert_leaves_close(ours: dict, theirs: dict, what: str, rtol: float) -> None:
    """Same leaves (flat dicts), each within rtol x its largest magnitude, plus 1e-6 x the largest of all (a leaf
    whose exact value is 0, like the gradient of a bias ahead of a BatchNorm, holds the float32 rounding noise of
    the terms that cancel in it, which the two programs round differently)."""
    assert ours.keys() == theirs.keys(), what
    floor = 1e-6 * max(np.abs(np.asarray(leaf)).max() for leaf in theirs.values())
    for path, theirs_leaf in theirs.items():
        a, b = np.asarray(ours[path], np.float64), np.asarray(theirs_leaf, np.float64)
        difference, tolerance = np.abs(a - b).max(), rtol * np.abs(b).max() + floor
        assert difference <= tolerance, f"{what} {'/'.join(path)}: differs by {difference:.3e} > {tolerance:.3e}"


def test_train_step_is_the_hand_written_adamw_step(seg_run):
    config, task, trainer, variables, batches = seg_run
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        state = jax.device_put(trainer.state_from_variables(variables["params"], variables["batch_stats"]),
                               trainer.state_shardings)
        step_fn = trainer.jit_train_step()
        constants = jax.device_put(task.constants, trainer.replicated)
        metrics = []
        for batch in batches:
            state, m = step_fn(state, device_batch(batch, trainer.batch_sharding), constants)
            metrics.append(jax.device_get(m))
    state = jax.device_get(state)
    hand = hand_written_steps(config, task, trainer.info.groups, variables, batches)

    assert int(state["step"]) == STEPS and int(state["nonfinite"]) == 0
    np.testing.assert_allclose([m["loss"] for m in metrics], hand["losses"], rtol=1e-6)
    np.testing.assert_allclose([m["lr"] for m in metrics], hand["lrs"], rtol=1e-6)
    # The frozen VAE is the given one, bit for bit, and has no optimizer state.
    np.testing.assert_equal(flatten_dict(state["frozen"]), flatten_dict({"vae": variables["params"]["vae"]}))
    _assert_leaves_close(flatten_dict(state["batch_stats"]), flatten_dict(hand["batch_stats"]), "batch_stats", 1e-6)
    # Adam's moments hold the gradients: equal to float32 rounding, which grows with the depth of the UNet's
    # backward pass (the second moment, a square, doubles the relative error).
    gradient_rtol = 1e-4
    for name, rtol in (("mu", gradient_rtol), ("nu", 2 * gradient_rtol)):
        _assert_leaves_close(flatten_dict(optax.tree_utils.tree_get(state["opt_state"], name)), hand[name],
                             f"Adam's {name}", rtol)
    # Parameters: each element's update within 1e-3 of the step (lr x lr_mult), plus what the rounding error of its
    # gradient can do: Adam's update depends on the ratio of gradients, so an element whose gradient g carries an
    # error e (the tolerance of the moments above) may move by up to about 2 e / |g| steps more, and one whose g is
    # all rounding noise may move either way in two correct computations (its moments were compared above); plus 4
    # float32 ulps of the parameter.
    old = flatten_dict({k: v for k, v in variables["params"].items() if k != "vae"})
    ours = flatten_dict(state["params"])
    assert ours.keys() == hand["params"].keys() == old.keys()
    floor = 1e-6 * max(np.abs(m).max() for m in hand["mu"].values())
    tight = 0  # elements held to within 0.2 steps
    for path, p0 in old.items():
        p0, g = np.asarray(p0, np.float64), np.abs(np.asarray(hand["mu"][path], np.float64))
        a, b = np.asarray(ours[path], np.float64) - p0, np.asarray(hand["params"][path], np.float64) - p0
        error = gradient_rtol * g.max() + floor
        with np.errstate(divide="ignore"):
            tolerance = (LR * trainer.info.groups["/".join(path)].lr_mult * (1e-3 + 2 * error / g)
                         + 4 * np.finfo(np.float32).eps * np.abs(p0))
        assert (np.abs(a - b) <= tolerance).all(), f"update of {'/'.join(path)}"
        tight += int((g > 10 * error).sum())
    assert tight > 0.5 * sum(p.size for p in old.values())
    assert max(np.abs(np.asarray(ours[p], np.float64) - old[p]).max() for p in old) > 0.5 * LR  # the steps moved


def test_parts_without_gradient_must_be_frozen():
    """The VAE gets no gradient unless model.train_vae: a param_groups that leaves it trainable is refused by name
    (AdamW would only decay it); with train_vae the same groups build."""
    config = get_config("vpd_seg_ade20k.py", "smoke")
    config.optim.param_groups = "all"
    task = make_task(config, presets.architecture("tiny"))
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match=r"leaves \d+ parameter\(s\) of \['vae'\] trainable .*train_vae=True"):
        build_trainer(config, task, mesh)
    config.model.train_vae = True
    trainer = build_trainer(config, make_task(config, presets.architecture("tiny")), mesh)
    assert not any(group.frozen for group in trainer.info.groups.values())
