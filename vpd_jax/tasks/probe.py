"""The feature-probe task ('probe'): which SD UNet blocks and timesteps carry text-aligned semantics.

The model (vpd_jax/models/probe.py) trains one small decoder per (tap, timestep) on the frozen UNet's features of
noised latents; evaluation gives every probe's PhraseCut metrics (docs/reference.md, "PhraseCut metrics"), which
vpd_jax/apps/probe.py turns into a table and a heatmap. Batches come from the 'phrasecut' pipeline.
Loss: the mean over probes of each probe's BCE-with-logits at full resolution. The decoders share no parameters,
so each gets the gradient of its own BCE (divided by the probe count, to which Adam is invariant): they train
exactly as if trained one by one on the same batches. Gradient clipping (global) would couple them: keep it off.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vpd_jax import metrics
from vpd_jax.models.compute import Compute
from vpd_jax.models.diffusion import LATENT_SCALE
from vpd_jax.models.presets import Architecture
from vpd_jax.models.probe import FeatureProbe, default_taps, probe_name
from vpd_jax.models.unet_config import OUTPUT_HEAD
from vpd_jax.tasks.base import Batch, text_tokenizer
from vpd_jax.tasks.phrase import PhraseTask

METRICS = ("mIoU@0.3", "IoU_FG@0.3", "IoU_FG@0.5", "AP")


def model_from_config(m: ml_collections.ConfigDict, arch: Architecture, compute: Compute) -> FeatureProbe:
    """FeatureProbe from a `config.model` section (`ProbeTask.model_config` lists the fields)."""
    valid, _ = arch.unet.module_names()
    taps = tuple(m.taps) or default_taps(arch.unet)
    unknown = [tap for tap in taps if tap not in valid]
    if unknown:
        raise ValueError(f"config.model.taps {unknown} are not modules of this UNet; valid names:\n  "
                         + "\n  ".join(valid))
    head = [tap for tap in taps if tap in OUTPUT_HEAD]
    if head:
        raise ValueError(f"config.model.taps {head}: the UNet's output head is not probed (its weights are not "
                         "part of the frozen tree that SD checkpoints fill)")
    model = FeatureProbe(unet=arch.unet, vae=arch.vae, text=arch.text, taps=taps,
                         timesteps=tuple(int(t) for t in m.timesteps), decoder_channels=m.decoder_channels,
                         latent_scale=m.latent_scale, sample_latent=m.sample_latent, compute=compute)
    model.check()
    return model


@dataclasses.dataclass
class ProbeMetric:
    """One PhraseCutMetric per probe; `result()` gives '<tap>/t=<t>/<metric>' for every probe, and the layout."""

    probes: tuple[tuple[str, int], ...]
    taps: tuple[str, ...]
    timesteps: tuple[int, ...]

    def __post_init__(self):
        self.metrics = [metrics.PhraseCutMetric() for _ in self.probes]

    def update(self, statistics) -> None:
        counts, valid = statistics
        for metric, probe_counts in zip(self.metrics, counts):
            metric.update(probe_counts, valid)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe_taps": list(self.taps), "probe_timesteps": list(self.timesteps)}
        for (tap, t), metric in zip(self.probes, self.metrics):
            out.update({f"{probe_name(tap, t)}/{name}": value for name, value in metric.result().items()})
        return out


class ProbeTask(PhraseTask):
    """'probe' for train.py / eval.py: batches of the 'phrasecut' pipeline (image, mask, tokens)."""

    name = "probe"
    optim_preset = "probe"
    frozen_subtrees = ("vae", "text_encoder", "unet")

    @staticmethod
    def model_config() -> ml_collections.ConfigDict:
        """arch ('init' or a preset), text_encoder / tokenizer (default: the `init` pipeline's; tokenizer 'hash' for
        CLIP-less runs), taps (() = `default_taps` of the UNet; any name of UNetConfig.module_names but the output
        head), timesteps, decoder_channels, latent_scale, sample_latent (False: the posterior mean)."""
        return ml_collections.ConfigDict(dict(
            arch="init", text_encoder="", tokenizer="",
            taps=(), timesteps=tuple(range(0, 1000, 100)), decoder_channels=64,
            latent_scale=LATENT_SCALE, sample_latent=False,
        ))

    @staticmethod
    def eval_config() -> ml_collections.ConfigDict:
        """seed: the per-example noise at evaluation; metric: the report's (one of METRICS; the JSON has all)."""
        return ml_collections.ConfigDict(dict(seed=0, metric="mIoU@0.3"))

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        super().__init__(config, arch)
        if config.data.task != self.pipeline:
            raise ValueError(f"the probe trains on phrase masks: config.data.task must be 'phrasecut', got "
                             f"{config.data.task!r}")
        if config.eval.metric not in METRICS:
            raise ValueError(f"config.eval.metric={config.eval.metric!r}; one of {METRICS}")
        self.model = model_from_config(config.model, arch, self.compute)
        self.tokenizer = text_tokenizer(config, arch)
        self.constants = {}

    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        mask = batch["mask"].astype(output.dtype)
        if output.shape[:3] != mask.shape[:3]:
            raise ValueError(f"logits {output.shape} and mask {mask.shape} differ in size")
        return optax.sigmoid_binary_cross_entropy(output, jnp.broadcast_to(mask, output.shape)).mean()

    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        logits, _ = self.apply(variables, batch, constants, train=False)
        probs = jax.nn.sigmoid(logits)
        counts = [metrics.phrasecut_counts(probs[..., p], batch["mask"][..., 0], example_mask=batch["valid"])[0]
                  for p in range(logits.shape[-1])]
        return jnp.stack(counts), batch["valid"]

    def new_metric(self) -> ProbeMetric:
        return ProbeMetric(self.model.probes, self.model.taps, self.model.timesteps)
