"""Feature probes of a Stable Diffusion UNet (the LD-ZNet paper's analysis; every choice here is ours, the
reference has no probing code).

  z0   = latent_scale x VAE posterior mean (or sample) of the image, frozen;
  c    = CLIP last_hidden_state of the phrase (in the pipeline's prompt template), frozen;
  per example one noise draw eps, used at every timestep (the timesteps differ only in t);
  z_t  = q_sample(z0, t, eps) for all t at once: one batched UNet call returns every tap, under stop_gradient,
         and stops after the block of the last tap (`output_sample=False`);
  per (tap, t) a decoder: LayerNorm over channels (taps differ in scale) -> 1x1 conv -> SiLU -> 3x3 conv -> SiLU
  -> 1x1 conv to one logit, bilinearly upsampled to the image (PyTorch semantics).

The frozen UNet's parameter tree is the whole SD UNet but its output head (init traces the full UNet), so any SD
checkpoint in `config.init` loads through the strict pretrained-weight path; the forward only runs up to the last
tap.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import resize
from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from vpd_jax.models.compute import Compute
from vpd_jax.models.diffusion import LATENT_SCALE, NoiseSchedule, q_sample
from vpd_jax.models.layers import Conv, LayerNorm
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import AutoencoderKLEncoder, VAEConfig

Dtype = Any


def default_taps(config: UNetConfig) -> tuple[str, ...]:
    """Every spatial transformer of the UNet, encoder to decoder: the attentions of each cross-attention down block,
    the middle block's, those of each cross-attention up block (16 for SD v1 / v2: 6 + 1 + 9). The LD-ZNet paper
    probes these 16 layers (at every 100th timestep); the tap is the transformer's output, before any down- or
    upsampler."""
    taps = [f"down_blocks.{i}.attentions.{j}" for i, kind in enumerate(config.down_block_types)
            if kind == "CrossAttnDownBlock2D" for j in range(config.layers_per_block[i])]
    taps.append("mid_block.attentions.0")  # the only mid block UNetConfig accepts has cross-attention
    taps += [f"up_blocks.{i}.attentions.{j}" for i, kind in enumerate(config.up_block_types)
             if kind == "CrossAttnUpBlock2D" for j in range(config.up_layers_per_block[i])]
    return tuple(taps)


def probe_name(tap: str, t: int) -> str:
    """The key of one probe in parameter trees and metric names."""
    return f"{tap}/t={t}"


def decoder_name(tap: str, t: int) -> str:
    """The parameter subtree of one probe's decoder (no dots: checkpoint keys join names with dots)."""
    return f"decoder_{tap.replace('.', '_')}_t{t}"


class ProbeDecoder(nn.Module):
    """Features (B, h, w, C) -> logits (B, H, W, 1) at the image size `size`."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, size: tuple[int, int]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(name="norm", **kw)(features)
        x = nn.silu(Conv(self.channels, 1, name="conv_in", **kw)(x))
        x = nn.silu(Conv(self.channels, 3, padding=1, name="conv_mid", **kw)(x))
        x = Conv(1, 1, name="conv_out", **kw)(x)
        return resize.bilinear(x.astype(jnp.float32), size)


class FeatureProbe(nn.Module):
    """Call: (images (B, H, W, 3) in [-1, 1], token_ids (B, L), keys (B,) PRNG keys) -> logits (B, H, W, P), one
    channel per probe in the order of `probes` (tap-major: all timesteps of the first tap, then the next tap)."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    taps: tuple[str, ...]
    timesteps: tuple[int, ...]
    decoder_channels: int = 64
    latent_scale: float = LATENT_SCALE
    sample_latent: bool = False
    schedule: NoiseSchedule = NoiseSchedule()
    compute: Compute = Compute()

    @property
    def probes(self) -> tuple[tuple[str, int], ...]:
        return tuple((tap, t) for tap in self.taps for t in self.timesteps)

    def check(self) -> None:
        if not self.taps or not self.timesteps:
            raise ValueError(f"the probe needs taps and timesteps, got taps={self.taps}, timesteps={self.timesteps}")
        if len(set(self.taps)) != len(self.taps) or len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"repeated taps or timesteps: {self.taps}, {self.timesteps}")
        bad = [t for t in self.timesteps if not 0 <= t < self.schedule.num_train_timesteps]
        if bad:
            raise ValueError(f"timesteps {bad} are outside [0, {self.schedule.num_train_timesteps})")
        if self.text.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(f"the text encoder's width {self.text.hidden_size} differs from the UNet's "
                             f"cross_attention_dim {self.unet.cross_attention_dim}")

    @nn.compact
    def __call__(self, images: jax.Array, token_ids: jax.Array, keys: jax.Array) -> jax.Array:
        self.check()
        kw = self.compute.layer_kwargs
        batch, size = images.shape[0], tuple(images.shape[1:3])
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        vae_keys, noise_keys = split[:, 0], split[:, 1]

        posterior = AutoencoderKLEncoder(self.vae, name="vae", **kw)(images)
        latent = posterior.mean
        if self.sample_latent:
            noise = jax.vmap(lambda k: jax.random.normal(k, latent.shape[1:], jnp.float32))(vae_keys)
            latent = latent + posterior.std * noise.astype(latent.dtype)
        z0 = jax.lax.stop_gradient(latent.astype(jnp.float32)) * self.latent_scale
        context = CLIPTextModel(self.text, name="text_encoder", **kw)(token_ids).last_hidden_state
        context = jax.lax.stop_gradient(context)

        count = len(self.timesteps)
        eps = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:], jnp.float32))(noise_keys)
        ts = jnp.repeat(jnp.asarray(self.timesteps, jnp.int32), batch)  # (T * B,), timestep-major
        z_t = q_sample(self.schedule, jnp.tile(z0, (count, 1, 1, 1)), ts, jnp.tile(eps, (count, 1, 1, 1)))
        unet = UNet2DConditionModel(self.unet, compute=self.compute, name="unet")
        taps = self.taps
        if self.is_initializing():
            # Create the whole UNet but its output head, so that SD checkpoints load strictly (module docstring).
            taps = tuple(dict.fromkeys(taps + (f"up_blocks.{len(self.unet.up_block_types) - 1}",)))
        out = unet(z_t, ts, jnp.tile(context, (count, 1, 1)), taps=taps, output_sample=False)
        features = {tap: jax.lax.stop_gradient(f).reshape(count, batch, *f.shape[1:]) for tap, f in out.taps.items()}

        logits = [ProbeDecoder(self.decoder_channels, name=decoder_name(tap, t), **kw)(
            features[tap][self.timesteps.index(t)], size) for tap, t in self.probes]
        return jnp.concatenate(logits, axis=-1)
