"""The LD-ZNet / ZNet task for train.py and eval.py ('ldznet' in `vpd_jax.tasks.TASKS`; spec/ldznet.md 2-4).

Batches come from the 'phrasecut' input pipeline (PhraseCut, or vpd_shapes phrases): image (B, S, S, 3) in [-1, 1],
mask (B, S, S, 1) in {0, 1}, tokens (B, L) of the phrase in a prompt template (random in training; at evaluation
drawn by a seed fixed per example, pipelines.py). The model's randomness (VAE sample, SD timestep and noise) comes
from one PRNG key per example:
  training    split from the train step's rng, so every step draws afresh (spec 7.4);
  evaluation  key(config.eval.seed) folded with the example's image_id (its position in the batch when a batch has
              none), so the metrics are reproducible and do not depend on the batch size or the host layout
              (spec 4.1 / 7.15: the reference draws all of these at random at test time).
Loss: BCE with logits at the full image resolution, mean over all pixels (spec 0, 7.1). Evaluation: PhraseCut
FixedIntervalMetrics on sigmoid(logits) (mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5, AP; spec 4.1), with the EMA parameters
when the optimizer keeps them (eval_lib).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vpd_jax import metrics, tasks
from vpd_jax.models.ldznet import LDZNet, is_new_parameter, params_from_sd
from vpd_jax.models.presets import Architecture

Batch = dict[str, Any]


def model_from_config(m: ml_collections.ConfigDict, arch: Architecture) -> LDZNet:
    """LDZNet from a `config.model` section (configs/ldznet_phrasecut.py lists the fields)."""
    return LDZNet(unet=arch.unet, vae=arch.vae, text=arch.text, inject=m.inject, sites=tuple(m.sites),
                  pool_image_size=m.pool_image_size, latent_scale=m.latent_scale, sample_latent=m.sample_latent,
                  sd_timesteps=tuple(m.sd_timesteps), sd_timestep_mode=m.sd_timestep_mode, head_init=m.head_init,
                  **tasks.compute_kwargs(m))


def example_keys(seed: int, batch: Batch) -> jax.Array:
    """Evaluation keys: one per example, from `seed` and the example's image_id (else its batch position)."""
    batch_size = batch["image"].shape[0]
    ids = batch["image_id"] if "image_id" in batch else jnp.arange(batch_size)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(ids).astype(jnp.uint32))


@dataclasses.dataclass
class _MetricAdapter:
    """eval_lib's accumulator interface (update(statistics), result()) over PhraseCutMetric."""

    metric: metrics.PhraseCutMetric = dataclasses.field(default_factory=metrics.PhraseCutMetric)

    def update(self, statistics) -> None:
        self.metric.update(*statistics)

    def result(self) -> dict:
        return self.metric.result()


class LDZNetTask(tasks.Task):
    name = "ldznet"
    frozen_subtrees = ("vae", "text_encoder", "sd_unet")

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        super().__init__(config, arch)
        m = config.model
        self.model = model_from_config(m, arch)
        self.tokenizer = tasks.text_tokenizer(config, arch)
        self.constants = {}

    def model_args(self, batch: Batch, constants: dict) -> tuple:
        return batch["image"], batch["tokens"]

    def init_variables(self, rng: jax.Array, batch: Batch, constants: dict) -> dict:
        params_rng, noise_rng = jax.random.split(rng)
        keys = jax.random.split(noise_rng, batch["image"].shape[0])
        return self.model.init(params_rng, *self.model_args(batch, constants), keys)

    def apply(self, variables: dict, batch: Batch, constants: dict, *, train: bool, rng: jax.Array | None = None):
        if train:
            if rng is None:
                raise ValueError("LD-ZNet training draws the VAE sample and the SD timestep/noise: pass rng")
            keys = jax.random.split(rng, batch["image"].shape[0])
        else:
            keys = example_keys(self.config.eval.seed, batch)
        return self.model.apply({"params": variables["params"]}, *self.model_args(batch, constants), keys), None

    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        if output.shape != batch["mask"].shape:
            raise ValueError(f"logits {output.shape} and mask {batch['mask'].shape} differ (spec 7.1: the loss is at "
                             "the full image resolution)")
        return optax.sigmoid_binary_cross_entropy(output, batch["mask"].astype(output.dtype)).mean()

    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        logits, _ = self.apply(variables, batch, constants, train=False)
        return metrics.phrasecut_counts(jax.nn.sigmoid(logits[..., 0]), batch["mask"][..., 0],
                                        example_mask=batch["valid"])

    def new_metric(self) -> _MetricAdapter:
        return _MetricAdapter()

    def pretrained_params(self, unet: dict, vae: dict, text_encoder: dict | None
                          ) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
        """For trainer.load_pretrained: the parameter subtrees SD weights give (spec 1.2: ZNet = the SD UNet with
        conv_out sliced to channel 0; the frozen extractor = the same UNet), and which parameters keep their
        initialisation (the head and the injection modules)."""
        m = self.config.model
        return (params_from_sd(self.arch.unet, unet, vae, text_encoder, inject=m.inject, sites=tuple(m.sites)),
                is_new_parameter)


tasks.TASKS[LDZNetTask.name] = LDZNetTask
