"""LAVT's SimpleDecoding, VPD's referring-segmentation head (docs/reference.md, "Referring model").

Input: the features finest first [x_c1 320@s/8, x_c2 (640+L)@s/16, x_c3 (1280+L)@s/32, x_c4 1280@s/64]
(channel counts read from the inputs). From the coarsest up, three stages of
  upsample (bilinear, align_corners=True, only when smaller) -> concat with the next finer feature ->
  conv3x3 (no bias) -> SyncBN -> ReLU -> conv3x3 (no bias) -> SyncBN -> ReLU,
then a 1x1 conv to 2 logits (background, foreground) and a bilinear align_corners=True resize to `output_size`.
Hidden width = coarsest channels // factor (1280 // 2 = 640). PyTorch default init throughout.
Names mirror LAVT (`conv1_4`, `bn1_4`, `conv2_4`, ..., `conv1_1`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import resize
from vpd_jax.models.heads.common import BatchNorm
from vpd_jax.models.layers import Conv

Dtype = Any


class SimpleDecoding(nn.Module):
    num_classes: int = 2
    factor: int = 2
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool,
                 output_size: Sequence[int] | None = None) -> jax.Array:
        if len(features) != 4:
            raise ValueError(f"SimpleDecoding takes 4 features (finest first), got {len(features)}")
        x_c1, x_c2, x_c3, x_c4 = features
        hidden = x_c4.shape[-1] // self.factor
        x = x_c4
        for stage, skip in (("4", x_c3), ("3", x_c2), ("2", x_c1)):
            if x.shape[1] < skip.shape[1] or x.shape[2] < skip.shape[2]:
                x = resize.bilinear(x, skip.shape[1:3], align_corners=True)
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            for i in ("1", "2"):
                x = Conv(hidden, 3, padding=1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"conv{i}_{stage}")(x)
                x = nn.relu(BatchNorm(self.bn_momentum, 1e-5, self.axis_name, self.dtype, self.param_dtype,
                                      name=f"bn{i}_{stage}")(x, train))
        logits = Conv(self.num_classes, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv1_1")(x)
        if output_size is not None:
            logits = resize.bilinear(logits, output_size, align_corners=True)
        return logits
