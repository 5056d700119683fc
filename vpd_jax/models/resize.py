"""Spatial resizes with the exact semantics of PyTorch's `F.interpolate(x, size=...)` (no antialias).

`jax.image.resize` samples at half-pixel centres, antialiases when downscaling and has no align_corners=True
mode, so the references' resizes (docs/reference.md, "Resizes") are written here:

* `bilinear(x, size, align_corners)`: 2-tap linear per axis. With align_corners=False the source coordinate is
  (dst + 0.5) * in/out - 0.5 clamped below at 0; with True it is dst * (in - 1)/(out - 1).
* `nearest(x, size)`: PyTorch's legacy 'nearest': src = min(floor(dst * (in/out)), in - 1), scale in float32.
* `bicubic(x, size)`: Keys cubic convolution with a = -0.75, align_corners=False, border taps clamped (not
  renormalised), so it can overshoot like PyTorch's.

Arrays are NHWC (any leading dims; the spatial axes are the 3rd and 2nd from last). The source indices and
weights depend only on the static sizes, so they are computed on the host in float32, as PyTorch's CPU kernel
does, and the resize itself is a gather plus a weighted sum: exact on every backend (no low-precision matmul).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75


def _source_coords(in_size: int, out_size: int, align_corners: bool, clamp_negative: bool) -> np.ndarray:
    """Continuous source coordinate of every output index (float32, as PyTorch's area_pixel_compute_source_index)."""
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
        return dst * scale
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    return np.maximum(src, np.float32(0)) if clamp_negative else src


def _linear_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices (out, 2), weights (out, 2)) of 2-tap linear interpolation along one axis."""
    src = _source_coords(in_size, out_size, align_corners, clamp_negative=True)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return np.stack([i0, i1], 1), np.stack([np.float32(1) - lam, lam], 1)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (out, 4), weights (out, 4)) of PyTorch's bicubic (a=-0.75, align_corners=False) along one axis."""
    src = _source_coords(in_size, out_size, align_corners=False, clamp_negative=False)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    a = np.float32(_CUBIC_A)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(idx, 0, in_size - 1), weights


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _apply_taps(x: jax.Array, axis: int, idx: np.ndarray, weights: np.ndarray) -> jax.Array:
    """out[..., o, ...] = sum_k weights[o, k] * x[..., idx[o, k], ...] along `axis`, computed in float32."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"interpolating resizes need a floating-point array, got {x.dtype} (use `nearest` for labels)")
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = None
    for k in range(idx.shape[1]):
        term = jnp.take(x32, jnp.asarray(idx[:, k]), axis=axis) * jnp.asarray(weights[:, k]).reshape(shape)
        out = term if out is None else out + term
    return out.astype(x.dtype)


def _check(x: jax.Array, size: Sequence[int]) -> tuple[int, int]:
    if x.ndim < 3:
        raise ValueError(f"resize expects (..., H, W, C) arrays, got shape {x.shape}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resize size must be two positive ints (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _spatial_axes(x: jax.Array) -> tuple[int, int]:
    return x.ndim - 3, x.ndim - 2


def bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """F.interpolate(mode='bilinear', align_corners=align_corners, antialias=False) on (..., H, W, C)."""
    out_hw = _check(x, size)
    for axis, out in zip(_spatial_axes(x), out_hw):
        if x.shape[axis] != out:
            x = _apply_taps(x, axis, *_linear_taps(x.shape[axis], out, align_corners))
    return x


def bicubic(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """F.interpolate(mode='bicubic', align_corners=False, antialias=False) on (..., H, W, C)."""
    out_hw = _check(x, size)
    for axis, out in zip(_spatial_axes(x), out_hw):
        if x.shape[axis] != out:
            x = _apply_taps(x, axis, *_cubic_taps(x.shape[axis], out))
    return x


def nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """F.interpolate(mode='nearest') on (..., H, W, C); works on integer arrays (label maps) too."""
    out_hw = _check(x, size)
    for axis, out in zip(_spatial_axes(x), out_hw):
        if x.shape[axis] != out:
            x = jnp.take(x, jnp.asarray(_nearest_index(x.shape[axis], out)), axis=axis)
    return x


def resize(x: jax.Array, size: Sequence[int], method: str, align_corners: bool = False) -> jax.Array:
    """Dispatch on `method` in {'bilinear', 'nearest', 'bicubic'} with F.interpolate semantics."""
    if method == "bilinear":
        return bilinear(x, size, align_corners)
    if align_corners:
        raise ValueError(f"align_corners=True is only supported for 'bilinear', not {method!r}")
    if method == "nearest":
        return nearest(x, size)
    if method == "bicubic":
        return bicubic(x, size)
    raise ValueError(f"unknown resize method {method!r}; expected 'bilinear', 'nearest' or 'bicubic'")
