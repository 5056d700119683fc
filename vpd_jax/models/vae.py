"""The encoder half of diffusers' `AutoencoderKL` (encoder + quant_conv), NHWC.

VPD only encodes: `latents = VAE.encode(x).mode()`, the posterior mean, with no scale factor (docs/reference.md, "VPD
backbone").
The decoder and post_quant_conv are not built; the weight loader skips them by name.

Parameter names mirror the diffusers state dict (`encoder/down_blocks_0/resnets_1/conv1/kernel`,
`encoder/mid_block/attentions_0/to_q/kernel`, `quant_conv/kernel`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vpd_jax.models.attention import Attention
from vpd_jax.models.compute import Compute
from vpd_jax.models.layers import ACT_NHWC, Conv, GroupNorm, constrain
from vpd_jax.models.resnet import Downsample2D, ResnetBlock2D

Dtype = Any

# config.json fields that only concern the decoder, the latent scaling or the pipeline: accepted and unused.
_UNUSED_FIELDS = frozenset({
    "out_channels", "up_block_types", "use_post_quant_conv", "sample_size", "scaling_factor", "shift_factor",
    "latents_mean", "latents_std", "force_upcast",
})
_SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """What the encoder needs from a diffusers `AutoencoderKL` config.json.

    `norm_eps` is not a config.json field: diffusers' `Encoder` hard-codes 1e-6 for every GroupNorm
    (resnets, mid-block attention and conv_norm_out), as ldm does (docs/reference.md, "Numerics").
    """

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("VAE config: block_out_channels is empty")
        if self.act_fn not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"VAE config: act_fn={self.act_fn!r} is not supported (supported: {_SUPPORTED_ACTIVATIONS})")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"VAE config: block_out_channels {self.block_out_channels} are not divisible by "
                    f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"VAE config: layers_per_block={self.layers_per_block} must be >= 1")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Parse a diffusers `AutoencoderKL` config.json; unknown or unsupported fields raise ValueError."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name={class_name!r}, only 'AutoencoderKL' is supported")
        own = {f.name for f in dataclasses.fields(cls)} - {"norm_eps"}
        known = own | _UNUSED_FIELDS | {"down_block_types"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"VAE config: unsupported field(s) {unknown}")
        kwargs = {k: config[k] for k in own if k in config}
        channels = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
        kwargs["block_out_channels"] = channels
        down_types = tuple(config.get("down_block_types", ("DownEncoderBlock2D",) * len(channels)))
        bad = sorted(set(down_types) - {"DownEncoderBlock2D"})
        if bad:
            raise ValueError(f"VAE config: down_block_types {bad} are not supported (only DownEncoderBlock2D)")
        if len(down_types) != len(channels):
            raise ValueError(f"VAE config: {len(down_types)} down_block_types but {len(channels)} block_out_channels")
        return cls(**kwargs)


# The VAE of Stable Diffusion v1.x and v2.x (ldm: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks; docs/reference.md,
# "Numerics").
SD_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2)


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)); logvar is already clipped to [-30, 20] as in diffusers."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise


class VAEMidAttention(nn.Module):
    """diffusers' mid-block `Attention` in its VAE form: group_norm, one head over all channels, q/k/v with
    bias, residual, divided by `rescale_output_factor` (1 in the VAE). Parameters sit directly under this
    module (`attentions_0/group_norm`, `attentions_0/to_q`, ...)."""

    groups: int
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(batch, height * width, channels)
        attention = Attention(num_heads=1, head_dim=channels, qkv_bias=True, upcast=True, compute=Compute(**kw))
        nn.share_scope(self, attention)
        h, _ = attention(h)
        out = constrain(x.astype(h.dtype) + h.reshape(x.shape), ACT_NHWC)  # see BasicTransformerBlock
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, time_emb=False, name=f"resnets_{i}", **kw)(x)
        if self.add_downsample:
            # diffusers' Encoder builds these with downsample_padding=0: pad (0, 1, 0, 1), then conv, as ldm.
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class VAEMidBlock(nn.Module):
    groups: int
    eps: float
    add_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, self.groups, self.eps, time_emb=False, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEMidAttention(self.groups, self.eps, name="attentions_0", **kw)(x)
        return ResnetBlock2D(channels, self.groups, self.eps, time_emb=False, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
    """diffusers' `Encoder` with double_z: returns 2 * latent_channels moment channels."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            h = DownEncoderBlock2D(channels, cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps,
                                   add_downsample=i != last, name=f"down_blocks_{i}", **kw)(h)
            h = constrain(h, ACT_NHWC)
        h = VAEMidBlock(cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_add_attention, name="mid_block", **kw)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        return Conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(h)


class AutoencoderKLEncoder(nn.Module):
    """x in [-1, 1], (B, H, W, in_channels) -> DiagonalGaussian over (B, H/f, W/f, latent_channels),
    f = 2 ** (len(block_out_channels) - 1)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> DiagonalGaussian:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        moments = Encoder(self.config, name="encoder", **kw)(x)
        if self.config.use_quant_conv:
            moments = Conv(moments.shape[-1], 1, name="quant_conv", **kw)(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        size = 2 ** (len(self.config.block_out_channels) - 1) * 4
        return (jnp.zeros((batch, size, size, self.config.in_channels), self.dtype),)
