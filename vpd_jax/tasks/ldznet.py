"""The LD-ZNet / ZNet task ('ldznet'; the original: docs/reference.md, "LD-ZNet").

Batches come from the 'phrasecut' input pipeline (PhraseCut, or vpd_shapes phrases): image (B, S, S, 3) in [-1, 1],
mask (B, S, S, 1) in {0, 1}, tokens (B, L) of the phrase in a prompt template (random in training; at evaluation
drawn by a seed fixed per example, pipelines.py). The model's randomness (VAE sample, SD timestep and noise) comes
from one PRNG key per example (vpd_jax/tasks/phrase.py): drawn afresh at every training step, as the reference
does, and fixed per example at evaluation, where the reference draws all of them at random at test time too
(docs/reference.md, "PhraseCut test protocol"; docs/fidelity.md).
Loss: BCE with logits at the full image resolution, mean over all pixels (docs/reference.md, "LD-ZNet loss").
Evaluation: PhraseCut FixedIntervalMetrics on sigmoid(logits) (mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5, AP;
docs/reference.md, "PhraseCut metrics"), with the EMA parameters when the optimizer keeps them
(vpd_jax/run/evaluation.py).
Predictions (`predict`): the image is squashed to the run's square size (data.aug.size, as the PhraseCut test protocol),
the phrase is put in data.aug.fixed_template (else the first training template, "a photo of a {}."; the reference draws
one at random; docs/reference.md, "LD-ZNet inference script"), the VAE sample and SD noise are seeded by eval.seed, and
the probabilities are resized back (bilinear, align_corners=True like the squash).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpd_jax import metrics
from vpd_jax.data.config import transform_config
from vpd_jax.models import resize
from vpd_jax.models.compute import Compute
from vpd_jax.models.diffusion import LATENT_SCALE
from vpd_jax.models.ldznet import LDZNet, is_new_parameter, params_from_sd
from vpd_jax.models.presets import Architecture
from vpd_jax.tasks.base import Accumulator, Batch, text_tokenizer
from vpd_jax.tasks.phrase import PhraseTask


def model_from_config(m: ml_collections.ConfigDict, arch: Architecture, compute: Compute) -> LDZNet:
    """LDZNet from a `config.model` section (`LDZNetTask.model_config` lists the fields)."""
    return LDZNet(unet=arch.unet, vae=arch.vae, text=arch.text, inject=m.inject, sites=tuple(m.sites),
                  pool_image_size=m.pool_image_size, latent_scale=m.latent_scale, sample_latent=m.sample_latent,
                  sd_timesteps=tuple(m.sd_timesteps), sd_timestep_mode=m.sd_timestep_mode, head_init=m.head_init,
                  compute=compute)


class LDZNetTask(PhraseTask):
    name = "ldznet"
    optim_preset = "ldznet"
    frozen_subtrees = ("vae", "text_encoder", "sd_unet")
    predict_inputs = ("text",)

    @staticmethod
    def model_config() -> ml_collections.ConfigDict:
        """arch ('init': UNet/VAE from config.init, the text encoder from its folder; or a preset), text_encoder /
        tokenizer (default: the `init` pipeline's; tokenizer 'hash' for CLIP-less runs), inject (False: ZNet),
        sites (() = the five SD v1 blocks of docs/reference.md, "Injection sites"), pool_image_size (the pools' learned
        grid is sized for this image side, 384 -> 12x12 / 6x6), latent_scale, sample_latent, sd_timesteps /
        sd_timestep_mode ('uniform' (low, high) per example, or 'mean' over listed t's), head_init ('pytorch' as the
        reference; 'upsample' starts the 1-channel 8x head as a nearest upsampler, for runs without SD weights),
        compvis_unet (which UNet of a CompVis training checkpoint in config.init initialises ZNet and the frozen
        extractor: 'model', the non-EMA weights of sd-v1-4-full-ema.ckpt as the reference, or 'model_ema'; a diffusers
        folder holds one, see vpd_jax/weights/loaders.py)."""
        return ml_collections.ConfigDict(dict(
            arch="init", text_encoder="", tokenizer="", compvis_unet="model",
            inject=True, sites=(), pool_image_size=384,
            latent_scale=LATENT_SCALE, sample_latent=True,  # the reference: posterior sample x 0.18215
            sd_timesteps=(300, 500), sd_timestep_mode="uniform",  # the reference: t in 300..499 per example
            head_init="pytorch",  # the reference; 'upsample' for runs from scratch (models/ldznet.py UpsampleHead)
        ))

    @staticmethod
    def eval_config() -> ml_collections.ConfigDict:
        """seed: of the per-example VAE sample, SD timestep and noise at evaluation (module docstring)."""
        return ml_collections.ConfigDict(dict(seed=0))

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        super().__init__(config, arch)
        self.model = model_from_config(config.model, arch, self.compute)
        self.tokenizer = text_tokenizer(config, arch)
        self.constants = {}

    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        if output.shape != batch["mask"].shape:
            raise ValueError(f"logits {output.shape} and mask {batch['mask'].shape} differ (the loss is at the full "
                             "image resolution)")
        return optax.sigmoid_binary_cross_entropy(output, batch["mask"].astype(output.dtype)).mean()

    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        logits, _ = self.apply(variables, batch, constants, train=False)
        return metrics.phrasecut_counts(jax.nn.sigmoid(logits[..., 0]), batch["mask"][..., 0],
                                        example_mask=batch["valid"])

    def new_metric(self) -> Accumulator:
        metric = metrics.PhraseCutMetric()
        return Accumulator(lambda s: metric.update(*s), metric.result)

    def pretrained_params(self, unet: dict, vae: dict, text_encoder: dict | None
                          ) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
        """For vpd_jax.run.start.pretrained_state: the parameter subtrees SD weights give (ZNet = the SD UNet with
        conv_out sliced to channel 0; the frozen extractor = the same UNet; docs/reference.md, "ZNet initialisation"),
        and which parameters keep their initialisation (the head and the injection modules)."""
        m = self.config.model
        return (params_from_sd(self.arch.unet, unet, vae, text_encoder, inject=m.inject, sites=tuple(m.sites)),
                is_new_parameter)


    @functools.cached_property
    def _probabilities(self):
        return jax.jit(lambda variables, batch: jax.nn.sigmoid(self.apply(variables, batch, {}, train=False)[0]))

    def predict(self, variables, constants, image, *, text: str, **inputs):
        """{'probability': (H, W) foreground probabilities of the phrase `text` (module docstring)}."""
        import tensorflow as tf

        from vpd_jax.data import transforms

        aug = transform_config(self.config.data)
        sample = transforms.phrasecut_eval(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), aug)
        template = aug.fixed_template or aug.templates[0]
        tokens = self.tokenizer([template.replace("{}", text)], self.config.data.text_max_length)
        batch = {"image": jnp.asarray(sample["image"].numpy())[None], "tokens": jnp.asarray(tokens)}
        probs = self._probabilities(variables, batch)
        return {"probability": np.asarray(resize.bilinear(probs, image.shape[:2], align_corners=True)[0, ..., 0])}
