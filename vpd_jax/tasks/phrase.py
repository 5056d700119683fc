"""What LD-ZNet and the feature probes share: batches of the 'phrasecut' pipeline (image, phrase tokens, mask) and a
model whose randomness (VAE sample, SD timesteps and noise) comes from one PRNG key per example:
  training    split from the train step's rng, so every step draws afresh;
  evaluation  key(config.eval.seed) folded with the example's image_id (its position in the batch when a batch has
              none), so the metrics are reproducible and do not depend on the batch size or the host layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.tasks.base import Batch, Task


def example_keys(seed: int, batch: Batch) -> jax.Array:
    """Evaluation keys: one per example, from `seed` and the example's image_id (else its batch position)."""
    batch_size = batch["image"].shape[0]
    ids = batch["image_id"] if "image_id" in batch else jnp.arange(batch_size)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(ids).astype(jnp.uint32))


class PhraseTask(Task):
    """A task on phrase masks whose model takes (images, token_ids, keys) (module docstring)."""

    pipeline = "phrasecut"

    def example_targets(self, batch_size: int) -> Batch:
        return {"mask": np.zeros((batch_size, *self.image_size(), 1), np.float32)}

    def model_args(self, batch: Batch, constants: dict) -> tuple:
        return batch["image"], batch["tokens"]

    def example_keys(self, batch: Batch, train: bool, rng: jax.Array | None) -> jax.Array:
        """One PRNG key per example (module docstring)."""
        if not train:
            return example_keys(self.config.eval.seed, batch)
        if rng is None:
            raise ValueError(f"{self.name} training draws its randomness per example from the step's rng: pass rng")
        return jax.random.split(rng, batch["image"].shape[0])

    def init_variables(self, rng: jax.Array, batch: Batch, constants: dict) -> dict:
        params_rng, noise_rng = jax.random.split(rng)
        with self.compute.trace_scope():
            return self.model.init(params_rng, *self.model_args(batch, constants),
                                   self.example_keys(batch, True, noise_rng))

    def apply(self, variables: dict, batch: Batch, constants: dict, *, train: bool, rng: jax.Array | None = None):
        """(output, None): these models keep no BatchNorm statistics."""
        keys = self.example_keys(batch, train, rng)
        with self.compute.trace_scope():
            return self.model.apply({"params": variables["params"]}, *self.model_args(batch, constants), keys), None
