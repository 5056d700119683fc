"""Multi-head attention: one functional core, the diffusers-named `Attention` layer and LD-ZNet's `AttentionPool2d`.

The core either returns the head-averaged softmax probabilities (computed explicitly, softmax in float32) or,
when nobody asked for them, calls `jax.nn.dot_product_attention`, which may dispatch to a fused kernel
(cuDNN flash attention on GPU) and never materialises the probabilities in HBM. Where no fused kernel exists
(XLA:CPU, TPU, fp32 on GPU) it does materialise them, (B, heads, Lq, Lk) float32 per layer, kept for the backward
pass: at SD's 64x64 latent 512 MiB per image and layer. `query_chunk` bounds that: a scan over query chunks
whose body is rematerialised, so one chunk's scores are all that exists at once, forward and backward.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.layers import Dense
from vpd_jax.models.resize import bicubic

Dtype = Any


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_probs: bool = False,
    upcast: bool = True,
    implementation: str | None = None,
    query_chunk: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention over (B, L, heads * head_dim) projections.

    Args:
      q, k, v: (B, Lq, H*D), (B, Lk, H*D), (B, Lk, H*Dv); heads are contiguous channel groups, as in PyTorch.
      scale: logit scale; head_dim ** -0.5 when None.
      causal: mask keys after the query position (CLIP's text encoder).
      return_probs: also return the softmax probabilities averaged over heads, (B, Lq, Lk), float32.
      upcast: compute logits and softmax in float32 (diffusers `upcast_attention`/`upcast_softmax`).
      implementation: passed to `jax.nn.dot_product_attention` on the fused path (None lets JAX choose).
      query_chunk: > 0: on the fused path, attend `query_chunk` queries at a time (module docstring); the
        result equals full attention up to float rounding. 0: all queries at once.
    Returns:
      (output (B, Lq, H*Dv) in q's dtype, head-averaged probabilities or None).
    """
    batch, q_len, width = q.shape
    head_dim = width // num_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qh = q.reshape(batch, q_len, num_heads, head_dim)
    kh = k.reshape(batch, k.shape[1], num_heads, head_dim)
    vh = v.reshape(batch, v.shape[1], num_heads, v.shape[-1] // num_heads)

    if not return_probs:
        def attend(queries):
            return jax.nn.dot_product_attention(queries, kh, vh, scale=scale, is_causal=causal,
                                                implementation=implementation)

        if query_chunk and q_len > query_chunk:
            if causal:
                raise ValueError("query_chunk with causal attention is not supported")
            out = _by_query_chunks(attend, qh, query_chunk)
        else:
            out = attend(qh)
        return out.reshape(batch, q_len, -1), None

    logits_dtype = jnp.float32 if upcast else q.dtype
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh.astype(logits_dtype), kh.astype(logits_dtype)) * scale
    if causal:
        allowed = jnp.tril(jnp.ones((q_len, k.shape[1]), dtype=bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), vh)
    return out.reshape(batch, q_len, -1), probs.mean(axis=1)


def _by_query_chunks(attend, qh: jax.Array, chunk: int) -> jax.Array:
    """attend(queries (B, chunk, H, D)) -> (B, chunk, H, Dv) over the queries of qh, `chunk` at a time; the last
    chunk is padded with zero queries, whose rows are dropped (softmax rows are independent)."""
    batch, q_len, heads, dim = qh.shape
    count = -(-q_len // chunk)
    qh = jnp.pad(qh, ((0, 0), (0, count * chunk - q_len), (0, 0), (0, 0)))
    chunks = jnp.moveaxis(qh.reshape(batch, count, chunk, heads, dim), 1, 0)
    _, out = jax.lax.scan(jax.checkpoint(lambda carry, queries: (carry, attend(queries))), None, chunks)
    return jnp.moveaxis(out, 0, 1).reshape(batch, count * chunk, heads, -1)[:, :q_len]


class Attention(nn.Module):
    """diffusers' `Attention`: to_q / to_k / to_v (bias optional), to_out.0 (with bias).

    Self-attention when `context` is None, cross-attention otherwise. Returns (output, head-mean probs or None).
    `query_chunk`: see `multi_head_attention`.
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    query_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, return_probs: bool = False):
        inner = self.num_heads * self.head_dim
        context = x if context is None else context
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_q", **dense)(x)
        k = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_k", **dense)(context)
        v = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_v", **dense)(context)
        out, probs = multi_head_attention(
            q, k, v, self.num_heads, return_probs=return_probs, upcast=self.upcast or self.dtype != jnp.float32,
            query_chunk=self.query_chunk)
        out = Dense(x.shape[-1], axes=("heads", "embed"), name="to_out_0", **dense)(out)
        return out, probs


class AttentionPool2d(nn.Module):
    """LD-ZNet's attention pool over a (B, h, w, C) feature map (spec/ldznet.md 2.4), keeping every token.

    Tokens are the spatial mean followed by the h*w positions (row-major), plus a learned positional embedding
    for a `spatial_dim` x `spatial_dim` grid (stored as (1 + S*S, C), the reference's (C, tokens) transposed,
    spec 7.20). Other grid sizes use the spatial part bicubic-resized with PyTorch's kernel (a = -0.75,
    align_corners=False) and the mean token's embedding unchanged. `qkv_proj` is chunked into q | k | v first,
    then each into `num_heads` contiguous channel groups; softmax over all 1 + h*w keys in float32; `c_proj`.
    No normalisation and no residual. Returns (B, 1 + h*w, C).

    The reference scales q and k by head_dim ** -1/4 each; one head_dim ** -1/2 on the logits is the same map.
    """

    spatial_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(f"AttentionPool2d: {channels} channels are not divisible into {self.num_heads} heads")
        side = self.spatial_dim
        pos = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(lambda key, shape, dtype: jax.random.normal(key, shape, dtype)
                                         / channels ** 0.5, ("pos", "embed")),
            (1 + side * side, channels), self.param_dtype).astype(jnp.float32)
        if (height, width) != (side, side):
            grid = bicubic(pos[1:].reshape(side, side, channels), (height, width)).reshape(height * width, channels)
            pos = jnp.concatenate([pos[:1], grid], axis=0)
        tokens = x.astype(jnp.float32).reshape(batch, height * width, channels)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1) + pos[None]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = jnp.split(Dense(3 * channels, axes=("embed", "mlp"), name="qkv_proj", **dense)(tokens), 3, axis=-1)
        out, _ = multi_head_attention(q, k, v, self.num_heads)
        return Dense(channels, axes=("mlp", "embed"), name="c_proj", **dense)(out)
