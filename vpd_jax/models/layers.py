"""Basic layers shared by every model: NHWC convolutions, dense layers and norms.

All of them
* create parameters with the PyTorch default initialisation (weight and bias ~ U(+-1/sqrt(fan_in))), so a
  model trained from scratch starts where the reference starts, unless an initialiser is passed;
* carry logical axis names on every parameter (see `vpd_jax.parallel` for the vocabulary and the rules);
* take `dtype` (computation) and `param_dtype` (storage) separately;
* compute normalisation statistics in float32 whatever `dtype` is, with a two-pass variance, as PyTorch does.

Parameter names (`kernel`, `bias`, `scale`) are what the weight converter in `vpd_jax.weights` maps from
PyTorch's `weight` / `bias`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.convolution import conv2d

Dtype = Any
Initializer = Callable[..., jax.Array]
Padding = int | tuple[tuple[int, int], tuple[int, int]]

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def torch_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _boxed(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """y = x @ kernel + bias over the last axis; kernel is (in, out), PyTorch's Linear weight transposed."""

    features: int
    use_bias: bool = True
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            _boxed(self.kernel_init or torch_uniform(fan_in), self.axes),
            (fan_in, self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", _boxed(self.bias_init or torch_uniform(fan_in), self.axes[1:]), (self.features,),
                self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _padding_pairs(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(int(p) for p in pair) for pair in padding)  # type: ignore[return-value]


class Conv(nn.Module):
    """2-D convolution on NHWC input with an HWIO kernel (PyTorch's OIHW weight transposed).

    `padding` is an int (symmetric, like PyTorch's `padding=`) or explicit ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Padding = 0
    use_bias: bool = True
    axes: tuple[str | None, ...] = CONV_AXES
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    implementation: str | None = None  # None: the one in effect (`compute.conv`); else 'auto' | 'xla' | 'matmul'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        kernel = self.param(
            "kernel",
            _boxed(self.kernel_init or torch_uniform(fan_in), self.axes),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        # Batch-sharded in and out: without these, jaxlib 0.10.2 miscompiles the kernel gradient of a
        # conv whose kernel is fsdp x tensor-sharded when a device holds a feature map of a few pixels
        # (tests/test_train.py, the pretrained sharded step; see BasicTransformerBlock for the forward case).
        x = constrain(x, ACT_NHWC)
        # XLA's convolution or the same sum as a matrix product: `vpd_jax.models.convolution`.
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, _padding_pairs(self.padding),
                   self.implementation)
        if self.use_bias:
            bias = self.param(
                "bias", _boxed(self.bias_init or torch_uniform(fan_in), self.axes[-1:]), (self.features,),
                self.param_dtype)
            y = y + bias.astype(self.dtype)
        return constrain(y, ACT_NHWC)


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis; statistics in float32, two-pass variance (PyTorch numerics)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", _boxed(nn.initializers.ones, ("norm",)), (channels,), self.param_dtype)
        bias = self.param("bias", _boxed(nn.initializers.zeros, ("norm",)), (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        grouped = x32.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        reduce_axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = grouped.mean(reduce_axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(reduce_axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; statistics in float32, two-pass variance (PyTorch numerics)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", _boxed(nn.initializers.ones, ("norm",)), (features,), self.param_dtype)
        bias = self.param("bias", _boxed(nn.initializers.zeros, ("norm",)), (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """The erf GELU of PyTorch's nn.GELU() (flax's nn.gelu defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


# Logical axes of the main activations: feature maps and token streams, sharded over the batch only.
ACT_NHWC = ("act_batch", "act_h", "act_w", "act_ch")
ACT_TOKENS = ("act_batch", "act_len", "act_embed")


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation; a no-op outside a mesh with rules (see vpd_jax.parallel)."""
    return nn.with_logical_constraint(x, axes)
