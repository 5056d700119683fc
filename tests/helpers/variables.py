"""Model variables for value tests, made on the host: compiling Flax's initialisers for a whole VPD model costs
more than the test that uses them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np

from tests.models.ldznet_reference import host_init

if TYPE_CHECKING:
    from vpd_jax.run.trainer import Trainer


def random_batch_stats(shapes: Any, seed: int) -> Any:
    """BatchNorm statistics that are not the identity (means near 0, variances in [0.5, 1.5]), so a model that
    ignored its running statistics would give other values."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        low, high = (0.5, 1.5) if path[-1].key == "var" else (-0.1, 0.1)
        return rng.uniform(low, high, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_like(shapes: dict, seed: int = 0) -> dict:
    """Host random values for variable shapes {'params', 'batch_stats' if any} (tests/models/ldznet_reference.host_init
    for the parameters, `random_batch_stats` for the statistics)."""
    variables = {"params": host_init(shapes["params"], seed)}
    if "batch_stats" in shapes:
        variables["batch_stats"] = random_batch_stats(shapes["batch_stats"], seed + 1)
    return variables


def random_variables(model: nn.Module, *args: Any, seed: int = 0, **kwargs: Any) -> dict:
    """Random variables of `model` for inputs `args`, from the shapes of `model.init` (traced, not compiled)."""
    return random_like(nn.meta.unbox(jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)),
                       seed)


def random_trainer_variables(trainer: Trainer, seed: int = 0) -> dict:
    """Random variables of a Trainer's model, from the shapes its train state already has (no second trace)."""
    state = trainer.abstract_state
    return random_like({"params": trainer.info.merge(state["params"], state["frozen"]),
                        "batch_stats": state["batch_stats"]}, seed)
