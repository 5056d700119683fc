"""Pallas attention kernels behind `compute.attention` ('splash', 'flash') and `compute.map_attention` ('pallas').

All take heads-first (B, heads, L, D) arrays, pad them to the kernels' tiles and return unpadded results; under a
mesh (`jax.set_mesh`) each device runs the kernel on its own batch (and head) shard.
"""
