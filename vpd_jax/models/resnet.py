"""diffusers-named residual blocks and resamplers, shared by the SD UNet and the VAE encoder."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models.layers import Conv, Dense, GroupNorm

Dtype = Any


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 (+ projected time embedding) -> GroupNorm -> SiLU -> conv3x3, plus the skip.

    The skip is a 1x1 `conv_shortcut` when the channel count changes. `time_emb=False` (the VAE) has no
    `time_emb_proj`. Dropout is 0 in every SD config and is not implemented.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    time_emb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
        if self.time_emb:
            if temb is None:
                raise ValueError("ResnetBlock2D built with time_emb=True needs a time embedding")
            t = Dense(self.out_channels, axes=("embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x.astype(h.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 stride-2 `conv`. padding=1: symmetric (UNet); padding=0: pad (0, 1, 0, 1) first (the SD VAE's)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return Conv(self.out_channels, 3, strides=2, padding=padding, name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """PyTorch `interpolate(mode='nearest')`: x2 by default, else to `size` with src = floor(dst * in / out)."""
    height, width = x.shape[1:3]
    if size is None or tuple(size) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, _nearest_source_index(height, size[0])][:, :, _nearest_source_index(width, size[1])]


def _nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch computes the scale and the product in float32; integer arithmetic can differ by one pixel.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


class Upsample2D(nn.Module):
    """Nearest x2 (or to `size`, used when the skip connection has an odd size) followed by a 3x3 `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, size)
        return Conv(self.out_channels, 3, padding=1, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
