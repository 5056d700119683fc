"""Attention that also returns its head-averaged softmax map, fused in one Pallas kernel (`compute.map_attention=
'pallas'`): the layers whose maps VPD records.

Our core (`vpd_jax.models.attention`) writes the per-head probabilities, (B, heads, Lq, Lk) float32, to memory to
average them. Here each grid step holds one query tile of one head with all its keys, computes that tile's
probabilities, its output rows, and adds them to the map tile, which stays in on-chip memory while the heads go
by (the innermost, sequential grid axis). Holding all keys suits the cross-attention maps VPD records (tens to
hundreds of keys); a self-attention map over thousands of keys may not fit a TPU core's on-chip memory.
The backward pass recomputes the probabilities the same way, one (query tile, head) at a time, and accumulates dK
and dV over the query tiles (the innermost axis there).

Values and gradients are those of the core: logits and softmax in float32, the output in v's dtype, and with
P = softmax, dP = dO V^T + (map cotangent) / heads, dS = scale * P * (dP - rowsum(P * dP)).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vpd_jax.models.compute import TILE, PallasOptions, current_matmul_precision, matmul_precision_context
from vpd_jax.models.kernels import tiles
from vpd_jax.models.kernels.sharding import device_axes

# The logit of a padded key (as JAX's TPU kernels mask): finite, so no inf - inf; exp(_MASKED - max) is 0.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # dot_general dimensions of a @ b.T


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    kv_len: int  # keys before padding
    heads: int  # of the whole layer: the map is their mean
    block_q: int
    interpret: bool
    precision: str | None  # the forward pass's matmul precision, for tracing the backward pass


def map_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, *, scale: float,
                  options: PallasOptions) -> tuple[jax.Array, jax.Array]:
    """softmax(scale q k^T) v over heads-first (B, H, L, D) arrays, and the probabilities averaged over heads.

    Returns ((B, H, Lq, Dv) in v's dtype, (B, Lq, Lk) float32).
    """
    batch, heads, q_len, _ = qh.shape
    kv_len, v_dim = kh.shape[2], vh.shape[3]
    width = tiles.padded_width(qh.shape[3], v_dim)
    block_q, q_padded = tiles.tile(options.block_q, q_len)
    kv_padded = tiles.round_up(kv_len, TILE)
    static = _Static(scale, kv_len, heads, block_q, options.interpret, current_matmul_precision())
    q, k, v = tiles.pad(qh, q_padded, width), tiles.pad(kh, kv_padded, width), tiles.pad(vh, kv_padded, width)

    def run(q, k, v):
        return _fused(q, k, v, static)

    spec = device_axes(batch)  # the map averages over the heads: each device holds all of them
    if spec is not None:
        run = jax.shard_map(run, in_specs=(spec,) * 3, out_specs=(spec, spec), check_vma=False)
    out, probs = run(q, k, v)
    return out[:, :, :q_len, :v_dim], probs[:, :q_len, :kv_len]


def _probabilities(q: jax.Array, k: jax.Array, static: _Static) -> jax.Array:
    """softmax(scale q k^T) of a (block_q, W) query tile against all (Lk padded, W) keys, float32; padded keys 0."""
    logits = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * static.scale
    if static.kv_len < k.shape[0]:
        keys = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(keys < static.kv_len, logits, _MASKED)
    exp = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, map_ref, *, static: _Static):
    head = pl.program_id(2)
    probs = _probabilities(q_ref[...], k_ref[...], static)
    v = v_ref[...]
    out_ref[...] = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(out_ref.dtype)

    @pl.when(head == 0)
    def _():
        map_ref[...] = jnp.zeros_like(map_ref)

    map_ref[...] += probs

    @pl.when(head == static.heads - 1)
    def _():
        map_ref[...] = map_ref[...] / static.heads


def _backward_kernel(q_ref, k_ref, v_ref, d_out_ref, d_map_ref, d_q_ref, d_k_ref, d_v_ref, *, static: _Static):
    q_tile = pl.program_id(2)
    q, k = q_ref[...], k_ref[...]
    probs = _probabilities(q, k, static)
    d_out = d_out_ref[...]
    d_probs = jax.lax.dot_general(d_out, v_ref[...], _NT, preferred_element_type=jnp.float32)
    d_probs = d_probs + d_map_ref[...] / static.heads
    d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * static.scale
    d_q_ref[...] = jnp.dot(d_logits, k.astype(jnp.float32), preferred_element_type=jnp.float32).astype(d_q_ref.dtype)

    @pl.when(q_tile == 0)
    def _():
        d_k_ref[...] = jnp.zeros_like(d_k_ref)
        d_v_ref[...] = jnp.zeros_like(d_v_ref)

    d_k_ref[...] += jnp.dot(d_logits.T, q.astype(jnp.float32), preferred_element_type=jnp.float32)
    d_v_ref[...] += jnp.dot(probs.T, d_out.astype(jnp.float32), preferred_element_type=jnp.float32)


def _specs(static: _Static, kv_padded: int, width: int, grid_order: str):
    """BlockSpecs of a query-side tile, the whole keys / values, and a map tile, for a grid over (batch, query
    tiles, heads) ('bqh') or (batch, heads, query tiles) ('bhq')."""
    def indices(fn):
        if grid_order == "bqh":
            return lambda b, i, h: fn(b, i, h)
        return lambda b, h, i: fn(b, i, h)

    query_side = pl.BlockSpec((None, None, static.block_q, width), indices(lambda b, i, h: (b, h, i, 0)))
    keys = pl.BlockSpec((None, None, kv_padded, width), indices(lambda b, i, h: (b, h, 0, 0)))
    map_tile = pl.BlockSpec((None, static.block_q, kv_padded), indices(lambda b, i, h: (b, i, 0)))
    return query_side, keys, map_tile


def _forward(q, k, v, static: _Static):
    (batch, heads, q_padded, width), kv_padded = q.shape, k.shape[2]
    query_side, keys, map_tile = _specs(static, kv_padded, width, "bqh")
    return pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(batch, q_padded // static.block_q, heads),
        in_specs=[query_side, keys, keys],
        out_specs=[query_side, map_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, q_padded, kv_padded), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=static.interpret,
    )(q, k, v)


def _backward(q, k, v, d_out, d_map, static: _Static):
    (batch, heads, q_padded, width), kv_padded = q.shape, k.shape[2]
    query_side, keys, map_tile = _specs(static, kv_padded, width, "bhq")
    return pl.pallas_call(
        functools.partial(_backward_kernel, static=static),
        grid=(batch, heads, q_padded // static.block_q),
        in_specs=[query_side, keys, keys, query_side, map_tile],
        out_specs=[query_side, keys, keys],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=static.interpret,
    )(q, k, v, d_out, d_map)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(q, k, v, static: _Static):
    return _forward(q, k, v, static)


def _fused_forward(q, k, v, static):
    return _forward(q, k, v, static), (q, k, v)


def _fused_backward(static, residuals, cotangents):
    q, k, v = residuals
    d_out, d_map = cotangents
    with matmul_precision_context(static.precision):
        d_q, d_k, d_v = _backward(q, k, v, d_out, d_map, static)
    return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype)


_fused.defvjp(_fused_forward, _fused_backward)
