"""Running a kernel on each device's share of the batch and heads.

A Pallas kernel is an opaque custom call to XLA's partitioner, which would gather its operands onto every device
and compute the whole batch there. Under a mesh (`jax.set_mesh`, as the training and evaluation loops run), the
kernels are therefore called inside `jax.shard_map` over the mesh axes that the logical axis rules give the batch
('act_batch') and the heads ('heads'), each kept only where it divides the size.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from vpd_jax import parallel


def device_axes(batch: int, heads: int = 1) -> PartitionSpec | None:
    """PartitionSpec(batch axes, head axes) of a heads-first (batch, heads, ...) array under the current mesh and
    logical axis rules (heads=1: each device holds all heads); None where that shards nothing (no mesh, one
    device, no rules, sizes the axes do not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = parallel.divisible_spec(nn.logical_to_mesh_axes(("act_batch", "heads")), (batch, heads), mesh)
    return spec if any(axes is not None for axes in spec) else None

