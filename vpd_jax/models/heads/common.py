"""Building blocks of the task heads: PyTorch-exact BatchNorm, mmcv's ConvModule, ConvTranspose2d, initialisers.

Parameter names mirror the reference modules (`conv`, `bn`; `kernel`/`scale`/`bias`; batch stats `mean`/`var`,
the same layout as flax's `nn.BatchNorm`) so that a PyTorch state dict maps over by renaming alone.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.layers import CONV_AXES, Conv, Initializer, torch_uniform

Dtype = Any

# ---------------------------------------------------------------------------------------------- initialisers


def kaiming_normal_fan_out() -> Initializer:
    """mmcv `kaiming_init` default (mode fan_out, ReLU gain): N(0, 2 / (out * kh * kw)) on an HWIO kernel."""
    return jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def xavier_uniform() -> Initializer:
    """torch `xavier_uniform_` (gain 1): U(+-sqrt(6 / (fan_in + fan_out))), receptive field included."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def normal(std: float) -> Initializer:
    """Untruncated N(0, std^2) (torch `normal_`; jax's `normal` initialiser is the same)."""
    return jax.nn.initializers.normal(std)


def trunc_normal(std: float, lower: float = -2.0, upper: float = 2.0) -> Initializer:
    """timm `trunc_normal_(std=std)`: N(0, std^2) truncated at the *absolute* bounds [lower, upper] (not +-2 std)."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32) * std).astype(dtype)

    return init


zeros = jax.nn.initializers.zeros

# ---------------------------------------------------------------------------------------------- layers


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's numerics.

    * train: normalise with the biased batch variance (two-pass, float32); update the running statistics with
      the *unbiased* variance, as torch does (flax's nn.BatchNorm uses the biased one);
      running = momentum * running + (1 - momentum) * batch (flax convention: torch momentum 0.1 is 0.9 here).
    * eval: normalise with the running statistics.
    Synced BN: under `jax.jit` over a mesh the batch axis is global, so the statistics already are; pass
    `axis_name` only inside `shard_map`/`pmap`, where the statistics are averaged over that axis.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (channels,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (channels,), self.param_dtype)
        stat_init = lambda init: nn.with_logical_partitioning(init, ("norm",))(None, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", stat_init, zeros)
        running_var = self.variable("batch_stats", "var", stat_init, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            mean = x32.mean(axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            var = jnp.square(x32 - mean).mean(axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ConvModule(nn.Module):
    """mmcv ConvModule: conv (bias only without norm, mmcv's bias='auto') -> optional BatchNorm -> optional ReLU.

    The default init is mmcv's: Kaiming-normal fan_out on the conv, bias 0, BN weight 1 / bias 0.
    """

    features: int
    kernel_size: int = 3
    padding: int = 1
    norm: bool = True
    activation: bool = True
    kernel_init: Initializer | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv(self.features, self.kernel_size, padding=self.padding, use_bias=not self.norm,
                 kernel_init=self.kernel_init or kaiming_normal_fan_out(), bias_init=zeros, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv")(x)
        if self.norm:
            x = BatchNorm(self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype, self.param_dtype,
                          name="bn")(x, train)
        return nn.relu(x) if self.activation else x


def deconv_config(kernel_size: int) -> tuple[int, int]:
    """(padding, output_padding) that make a stride-2 ConvTranspose2d exactly double the size (GLPDepth's table)."""
    table = {4: (1, 0), 3: (1, 1), 2: (0, 0)}
    if kernel_size not in table:
        raise ValueError(f"deconv kernel size must be one of {sorted(table)}, got {kernel_size}")
    return table[kernel_size]


class ConvTranspose(nn.Module):
    """PyTorch ConvTranspose2d on NHWC. `kernel` is (kh, kw, in, out) = torch's (in, out, kh, kw) weight permuted
    by (2, 3, 0, 1), with no flip: the flip that turns the transposed conv into a direct conv over the dilated
    input happens here, so ported weights need no special handling."""

    features: int
    kernel_size: int = 2
    strides: int = 2
    padding: int = 0
    output_padding: int = 0
    use_bias: bool = True
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = self.features * k * k  # torch computes the default bound from weight.size(1) = out channels
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init or torch_uniform(fan_in), CONV_AXES),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        lo = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.flip(kernel, (0, 1)).astype(self.dtype), window_strides=(1, 1),
            padding=((lo, lo + self.output_padding),) * 2, lhs_dilation=(self.strides, self.strides),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init or torch_uniform(fan_in),
                                                                   CONV_AXES[-1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

