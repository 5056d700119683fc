"""Padding heads-first (B, H, L, D) arrays to the Pallas kernels' tiles.

Sequences are padded to a whole number of tiles, tiles are multiples of 128 (the TPU's lanes), and head widths
are padded with zeros to a multiple of 128 (MaxDiffusion pads the widths under 128 for the TPU kernels; JAX's
flash kernel refuses a width over 128 that is not a multiple of it): zero columns add nothing to q k^T, and zero
value columns give zero output columns, which are cut off. Padded keys must be masked by the kernel; padded
queries give rows that are cut off (and whose cotangents are zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vpd_jax.models.compute import TILE


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tile(block: int, length: int) -> tuple[int, int]:
    """(tile, padded length) for a sequence of `length` and a configured tile of `block` (a multiple of 128): a
    sequence shorter than the tile is one tile of the next multiple of 128."""
    size = min(block, round_up(length, TILE))
    return size, round_up(length, size)


def padded_width(*head_dims: int) -> int:
    """One head width for q, k and v (the kernels take one): the widest, rounded up to a multiple of 128."""
    return round_up(max(head_dims), TILE)


def pad(t: jax.Array, length: int, width: int) -> jax.Array:
    """(B, H, L, D) zero-padded to (B, H, length, width)."""
    return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, width - t.shape[3])))
