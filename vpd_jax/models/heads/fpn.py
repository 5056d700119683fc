"""Semantic FPN for VPD segmentation: mmseg's FPN neck + FPNHead (docs/reference.md, "Segmentation model and loss").

Input: the backbone features finest first, e.g. [320@s/8, (640+N)@s/16, (1280+N)@s/32, 1280@s/64] (channel
counts are read from the inputs). Output: class logits at the finest feature's resolution (s/8); the loss and
inference upsample them (align_corners=False).

Names mirror mmseg (`neck.lateral_convs.0.conv.weight` -> `neck/lateral_convs_0/conv/kernel`,
`decode_head.scale_heads.2.2.bn.running_mean` -> batch_stats `decode_head/scale_heads_2_2/bn/mean`; the Sequential
index counts the parameter-free Upsample modules too, so head i's ConvModules sit at indices 0, 2, 4).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import resize
from vpd_jax.models.heads.common import ConvModule, normal, xavier_uniform, zeros
from vpd_jax.models.layers import Conv

Dtype = Any


class FPN(nn.Module):
    """mmseg FPN (start_level 0, num_outs = number of inputs, no norm/activation/extra convs).

    Lateral 1x1 convs, a cumulative top-down path with *nearest* upsampling, 3x3 output convs; all convs
    Xavier-uniform with bias 0 (the neck's own init overrides ConvModule's Kaiming).
    """

    out_channels: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, kernel_size: int, name: str) -> ConvModule:
        return ConvModule(self.out_channels, kernel_size, padding=kernel_size // 2, norm=False, activation=False,
                          kernel_init=xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        laterals = [self._conv(1, f"lateral_convs_{i}")(f) for i, f in enumerate(features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize.nearest(laterals[i], laterals[i - 1].shape[1:3])
        return [self._conv(3, f"fpn_convs_{i}")(lateral) for i, lateral in enumerate(laterals)]


def _upsampling_steps(base_hw: Sequence[int], hw: Sequence[int]) -> int:
    """log2 of the stride ratio between the finest level and this one (mmseg: log2(stride_i / stride_0))."""
    ratio = base_hw[0] / hw[0]
    steps = round(math.log2(ratio)) if ratio >= 1 else -1
    if steps < 0 or 2 ** steps != ratio:
        raise ValueError(f"FPNHead levels must be the finest size {tuple(base_hw)} divided by a power of two, "
                         f"got {tuple(hw)}")
    return steps


class FPNHead(nn.Module):
    """mmseg FPNHead (align_corners False): per level max(1, log2 ratio) ConvModules (3x3, no bias, SyncBN, ReLU),
    each followed by a bilinear x2 upsample on the coarser levels; sum; Dropout2d; 1x1 conv_seg N(0, 0.01)."""

    num_classes: int
    channels: int = 256
    dropout_ratio: float = 0.1
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        base_hw = features[0].shape[1:3]
        output = None
        for i, x in enumerate(features):
            steps = _upsampling_steps(base_hw, x.shape[1:3])
            for k in range(max(1, steps)):
                x = ConvModule(self.channels, 3, padding=1, bn_momentum=self.bn_momentum, axis_name=self.axis_name,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name=f"scale_heads_{i}_{2 * k if steps else k}")(x, train)
                if steps:
                    x = resize.bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=False)
            x = resize.bilinear(x, base_hw, align_corners=False)  # the identity for exact power-of-two strides
            output = x if output is None else output + x
        # Dropout2d: whole channels of an example are dropped together.
        output = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2))(output, deterministic=not train)
        return Conv(self.num_classes, 1, kernel_init=normal(0.01), bias_init=zeros, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv_seg")(output)


class SemanticFPN(nn.Module):
    """FPN neck + FPNHead, named like mmseg's EncoderDecoder (`neck`, `decode_head`)."""

    num_classes: int
    channels: int = 256
    dropout_ratio: float = 0.1
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        pyramid = FPN(self.channels, self.dtype, self.param_dtype, name="neck")(features)
        return FPNHead(self.num_classes, self.channels, self.dropout_ratio, self.bn_momentum, self.axis_name,
                       self.dtype, self.param_dtype, name="decode_head")(pyramid, train)
