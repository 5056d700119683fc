"""VPD depth head: the encoder's feature fusion, the GLPDepth deconv decoder and the depth output (docs/reference.md,
"Depth model").

Input: the four UNet features finest first [o0 (s/8), o1 (s/16), o2 (s/32), o3 (s/64)] (no attention channels);
output depth (B, H, W, 1) = sigmoid(z) * max_depth at the input resolution (s/32 * 32).

The 480 -> 512 zero pad of the image belongs to the model wrapper; it then calls this head with
`fusion_size=(15, 15)`, which keeps the top-left 15x15 of the 16x16 s/32 fusion map so the output is 480, not 512
(the reference's `[:, :, :-1, :-1]`; with an explicit size, a 480x640 input padded to 512x640 crops rows only).

Names mirror the reference (`encoder.layer1.0.weight` -> `encoder/layer1_0/kernel`,
`decoder.deconv_layers.4.running_var` -> batch_stats `decoder/deconv_layers_4/var`, `last_layer_depth.2.bias`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import resize
from vpd_jax.models.heads.common import BatchNorm, ConvTranspose, deconv_config, normal, trunc_normal, zeros
from vpd_jax.models.layers import Conv, GroupNorm

Dtype = Any


class DepthFusion(nn.Module):
    """VPDDepthEncoder's fusion of the UNet features into one s/32 map (init trunc_normal(0.02), bias 0).

    cat[layer1(o0), layer2(o1), o2, nearest_x2(o3)] -> 1x1 conv -> GN(16) -> ReLU, where
    layer1 = conv3x3 s2 -> GN(16) -> ReLU -> conv3x3 s2 and layer2 = conv3x3 s2.
    """

    out_channels: int = 1536
    num_groups: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, kernel_size: int, strides: int, name: str) -> Conv:
        return Conv(features, kernel_size, strides=strides, padding=kernel_size // 2, kernel_init=trunc_normal(0.02),
                    bias_init=zeros, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.num_groups, 1e-5, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        if len(features) != 4:
            raise ValueError(f"the depth head takes 4 features (finest first), got {len(features)}")
        o0, o1, o2, o3 = features
        x1 = self._conv(o0.shape[-1], 3, 2, "layer1_0")(o0)
        x1 = self._conv(o0.shape[-1], 3, 2, "layer1_3")(nn.relu(self._norm("layer1_1")(x1)))
        x2 = self._conv(o1.shape[-1], 3, 2, "layer2_0")(o1)
        o3_up = resize.nearest(o3, o2.shape[1:3])  # F.interpolate(scale_factor=2): nearest by default
        x = jnp.concatenate([x1, x2, o2.astype(x1.dtype), o3_up.astype(x1.dtype)], axis=-1)
        return nn.relu(self._norm("out_layer_1")(self._conv(self.out_channels, 1, 1, "out_layer_0")(x)))


class DepthDecoder(nn.Module):
    """GLPDepth decoder: per stage ConvTranspose(k, stride 2, no bias) -> BN -> ReLU; conv3x3 -> BN -> ReLU;
    two bilinear x2 upsamples (align_corners False). Conv/deconv init N(0, 0.001), bias 0. The reference BN is
    per-GPU; here its statistics are over the whole (global) batch."""

    num_filters: Sequence[int] = (32, 32, 32)
    deconv_kernels: Sequence[int] = (2, 2, 2)
    out_channels: int = 192
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _bn(self, name: str) -> BatchNorm:
        return BatchNorm(self.bn_momentum, 1e-5, self.axis_name, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if len(self.num_filters) != len(self.deconv_kernels):
            raise ValueError(f"num_filters {tuple(self.num_filters)} and deconv_kernels {tuple(self.deconv_kernels)} "
                             f"must have the same length")
        for i, (features, kernel) in enumerate(zip(self.num_filters, self.deconv_kernels)):
            padding, output_padding = deconv_config(kernel)
            x = ConvTranspose(features, kernel, 2, padding, output_padding, use_bias=False, kernel_init=normal(0.001),
                              dtype=self.dtype, param_dtype=self.param_dtype, name=f"deconv_layers_{3 * i}")(x)
            x = nn.relu(self._bn(f"deconv_layers_{3 * i + 1}")(x, train))
        x = Conv(self.out_channels, 3, padding=1, kernel_init=normal(0.001), bias_init=zeros, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="conv_layers_0")(x)
        x = nn.relu(self._bn("conv_layers_1")(x, train))
        for _ in range(2):
            x = resize.bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=False)
        return x


class DepthHead(nn.Module):
    """Fusion -> optional 16 -> 15 crop -> decoder -> last_layer_depth (conv3x3, ReLU, conv3x3 -> 1) ->
    sigmoid * max_depth, in float32."""

    max_depth: float = 10.0
    fusion_channels: int = 1536
    num_filters: Sequence[int] = (32, 32, 32)
    deconv_kernels: Sequence[int] = (2, 2, 2)
    decoder_channels: int = 192
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool,
                 fusion_size: Sequence[int] | None = None) -> jax.Array:
        x = DepthFusion(self.fusion_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")(features)
        if fusion_size is not None:  # as the reference: drop the s/32 rows/columns that only saw the zero padding
            if fusion_size[0] > x.shape[1] or fusion_size[1] > x.shape[2]:
                raise ValueError(f"fusion_size {tuple(fusion_size)} exceeds the fusion map {x.shape[1:3]}")
            x = x[:, :fusion_size[0], :fusion_size[1], :]
        x = DepthDecoder(self.num_filters, self.deconv_kernels, self.decoder_channels, self.bn_momentum,
                         self.axis_name, self.dtype, self.param_dtype, name="decoder")(x, train)
        conv = lambda features, name: Conv(features, 3, padding=1, kernel_init=normal(0.001), bias_init=zeros,
                                           dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        z = conv(1, "last_layer_depth_2")(nn.relu(conv(self.decoder_channels, "last_layer_depth_0")(x)))
        return jax.nn.sigmoid(z.astype(jnp.float32)) * self.max_depth
