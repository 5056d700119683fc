"""The sharded train state and the jitted train step of a task on a mesh (`build_trainer` -> `Trainer`).

The train state is a dict: step, params (trainable), frozen (VAE, CLIP), batch_stats, opt_state, and the
counters of non-finite steps (NONFINITE_COUNTERS; such a step's update is never applied, see config.nonfinite).
Steps are counted as the logs count them: train step s is the s-th update, the one that turns state step s - 1
into s.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from vpd_jax import parallel
from vpd_jax.run import optim
from vpd_jax.tasks.base import Task

# ------------------------------------------------------------------------------------------------ the state

# Int32 scalars of the state, all 0 at step 0 (steps are train steps, 0 = none):
#   nonfinite                      how many train steps were non-finite (and not applied)
#   first_nonfinite_step           the first of them
#   nonfinite_streak               how many consecutive train steps up to this state's step were non-finite
#   longest_nonfinite_streak       the longest such run so far, and the train step it ended at
#   longest_nonfinite_streak_end
NONFINITE_COUNTERS = ("nonfinite", "first_nonfinite_step", "nonfinite_streak", "longest_nonfinite_streak",
                      "longest_nonfinite_streak_end")


def initial_state(tx: optax.GradientTransformation, info: optim.OptimizerInfo, params: dict,
                  batch_stats: dict) -> dict:
    """The train state at step 0 for the model variables `params` / `batch_stats`."""
    trainable, frozen = info.split(params)
    return dict(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, batch_stats=batch_stats,
                opt_state=tx.init(trainable), **{name: jnp.zeros((), jnp.int32) for name in NONFINITE_COUNTERS})


def count_nonfinite(state: dict, finite: jax.Array, step: jax.Array) -> dict:
    """The NONFINITE_COUNTERS after train step `step`, finite or not."""
    bad = ~finite
    streak = jnp.where(bad, state["nonfinite_streak"] + 1, 0)
    longer = streak > state["longest_nonfinite_streak"]
    return dict(
        nonfinite=state["nonfinite"] + bad.astype(jnp.int32),
        first_nonfinite_step=jnp.where(bad & (state["nonfinite"] == 0), step, state["first_nonfinite_step"]),
        nonfinite_streak=streak,
        longest_nonfinite_streak=jnp.where(longer, streak, state["longest_nonfinite_streak"]),
        longest_nonfinite_streak_end=jnp.where(longer, step, state["longest_nonfinite_streak_end"]),
    )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything the step functions close over (built by `build_trainer`)."""

    config: ml_collections.ConfigDict
    task: Task
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    info: optim.OptimizerInfo
    example: dict
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    replicated: NamedSharding

    def initial_variables(self, rng: jax.Array) -> dict:
        """The model's freshly initialised variables ('params', maybe 'batch_stats'), unboxed."""
        return nn.meta.unbox(self.task.init_variables(rng, self.example, self.task.constants))

    def create_state(self, rng: jax.Array) -> dict:
        variables = self.initial_variables(rng)
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
        grad_norm = _tree_norm(grads)
        lr = self.info.lr_at_step(step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)
        (params, opt_state), finite = self._guarded_update(grads, state, finite)
        batch_stats = state["batch_stats"]
        if new_stats is not None:
            batch_stats = _keep_if(finite, new_stats, batch_stats)

        new_state = dict(step=step + 1, params=params, frozen=state["frozen"], batch_stats=batch_stats,
                         opt_state=opt_state, **count_nonfinite(state, finite, step + 1))
        metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=_tree_norm(new_state["params"]),
                       lr=lr)
        return new_state, metrics

    def _guarded_update(self, grads, state: dict, finite: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
        """(params, opt_state) after the optimizer update, or as they were when the step is not finite.

        A step is finite when its loss, gradient norm and learning rate are (`finite`) and so is the norm of the
        parameters the update would give. That norm comes from a sum of squares in the parameters' dtype, which
        also overflows when an update explodes without producing inf or NaN (an lr of 1e30 gives finite but huge
        parameters from a finite loss, gradient and lr): such a state is never applied, so never checkpointed.
        The old parameters are finite (every applied state passed this check, and the weight loaders refuse
        non-finite files), so any non-finite element of the update shows in the norm.

        nonfinite_check 'gradients': a first pass of the update gives only the new parameters' norm, then the
        update is computed again, in place, under a lax.cond, when the step is finite. It costs the optimizer's
        elementwise work twice (a memory-bound pass over parameters, gradients and moments). A backend that fuses
        that arithmetic into the norm's reduction keeps no new parameters in the first pass; XLA:CPU does not
        fuse it and keeps the first pass's results, as much memory as 'updates' needs.
        'updates' computes the new state once, completely, before the old one may be overwritten: new and old
        moments and parameters live side by side, about one more copy of the trainable parameters at the step's
        peak on any backend (`python -m bench.run --full` measures both).
        """
        @jax.jit  # traced once for both passes (_tree_norm)
        def update(params, opt_state, grads):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        old = (state["params"], state["opt_state"])
        if self.config.nonfinite_check == "updates":
            new = update(*old, grads)
            finite = finite & jnp.isfinite(_tree_norm(new[0]))
            return _keep_if(finite, new, old), finite
        # The barrier (it renames the inputs, copies nothing) keeps XLA from merging the first pass with the update
        # under the cond; merged, XLA:CPU kept more of the first pass's results alive until the cond.
        first_pass_inputs = jax.lax.optimization_barrier((*old, grads))
        finite = finite & jnp.isfinite(_tree_norm(update(*first_pass_inputs)[0]))
        return jax.lax.cond(finite, update, lambda p, o, g: (p, o), *old, grads), finite

    def jit_train_step(self):
        constants_sharding = jax.tree.map(lambda _: self.replicated, self.task.constants)
        return jax.jit(self.train_step, donate_argnums=(0,),
                       in_shardings=(self.state_shardings, self.batch_sharding, constants_sharding),
                       out_shardings=(self.state_shardings, self.replicated))


# The parameter-wise work of a train step, jitted so that a step traces it once however often it calls it (the
# guard's two passes of the update, the norms of the gradients and of the parameters before and after): a nested
# jit is inlined by XLA, so the compiled step is the same, but tracing a few hundred leaves' optimizer arithmetic
# is a large part of the step's trace time, paid again at every start of a run.
_tree_norm = jax.jit(optax.tree.norm)


def _keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


NONFINITE_CHECKS = ("gradients", "updates")


def check_nonfinite_guard(config) -> None:
    """config.nonfinite_check is known."""
    if config.nonfinite_check not in NONFINITE_CHECKS:
        raise ValueError(f"config.nonfinite_check={config.nonfinite_check!r}; use one of {NONFINITE_CHECKS}")


def sharding_rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in config.sharding_rules)


def check_frozen_parts_are_frozen(config, task: Task, info: optim.OptimizerInfo) -> None:
    """The parts the model never sends a gradient to (Task.frozen_subtrees; the VAE unless model.train_vae) must be
    in a frozen parameter group: a trainable group would only decay them towards zero, step after step."""
    never_trained = [s for s in task.frozen_subtrees if not (s == "vae" and config.model.get("train_vae", False))]
    trainable = sorted(path for path, group in info.groups.items()
                       if not group.frozen and path.split("/")[0] in never_trained)
    if trainable:
        raise ValueError(
            f"config.optim.param_groups={config.optim.param_groups!r} leaves {len(trainable)} parameter(s) of "
            f"{sorted({p.split('/')[0] for p in trainable})} trainable (e.g. {trainable[0]}), but the model sends "
            f"them no gradient: AdamW would only decay them. Freeze them (a rule "
            f"dict(pattern='^({'|'.join(never_trained)})/', frozen=True))"
            + (" or set config.model.train_vae=True to train the VAE." if "vae" in never_trained
               and "train_vae" in config.model else "."))


def build_trainer(config, task: Task, mesh) -> Trainer:
    """The Trainer of `config` on `mesh`; the task's example batch gives the model's input shapes."""
    check_nonfinite_guard(config)
    rules = sharding_rules(config)
    example = task.example_batch()
    total_updates = config.total_steps // config.optim.grad_accum_steps
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda rng: task.init_variables(rng, example, task.constants), jax.random.key(0))
    tx, info = optim.make_optimizer(config.optim, boxed["params"], total_updates,
                                    steps_per_epoch=config.steps_per_epoch or None)
    check_frozen_parts_are_frozen(config, task, info)
    # The variables are arguments, not closed over: an optimizer init that copies arrays (the EMA) needs tracers.
    boxed_state = jax.eval_shape(lambda params, stats: initial_state(tx, info, params, stats), boxed["params"],
                                 boxed.get("batch_stats", {}))
    state_shardings = parallel.logical_to_shardings(boxed_state, mesh, rules)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  nn.meta.unbox(boxed_state), state_shardings)
    logging.info("parameter groups:\n%s", info.summary(nn.meta.unbox(boxed["params"])))
    return Trainer(config, task, mesh, rules, tx, info, example, state_shardings, abstract_state,
                   batch_sharding=NamedSharding(mesh, P(("data", "fsdp"))), replicated=NamedSharding(mesh, P()))
