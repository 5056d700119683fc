"""Multi-head attention: one functional core and the diffusers-named `Attention` layer.

The core either returns the head-averaged softmax probabilities (computed explicitly, softmax in float32) or,
when nobody asked for them, calls `jax.nn.dot_product_attention`, which may dispatch to a fused kernel
(cuDNN flash attention on GPU) and never materialises the probabilities in HBM.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.layers import Dense

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
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention over (B, L, heads * head_dim) projections.

    Args:
      q, k, v: (B, Lq, H*D), (B, Lk, H*D), (B, Lk, H*Dv); heads are contiguous channel groups, as in PyTorch.
      scale: logit scale; head_dim ** -0.5 when None.
      causal: mask keys after the query position (CLIP's text encoder).
      return_probs: also return the softmax probabilities averaged over heads, (B, Lq, Lk), float32.
      upcast: compute logits and softmax in float32 (diffusers `upcast_attention`/`upcast_softmax`).
      implementation: passed to `jax.nn.dot_product_attention` on the fused path (None lets JAX choose).
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
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, is_causal=causal, implementation=implementation)
        return out.reshape(batch, q_len, -1), None

    logits_dtype = jnp.float32 if upcast else q.dtype
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh.astype(logits_dtype), kh.astype(logits_dtype)) * scale
    if causal:
        allowed = jnp.tril(jnp.ones((q_len, k.shape[1]), dtype=bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), vh)
    return out.reshape(batch, q_len, -1), probs.mean(axis=1)


class Attention(nn.Module):
    """diffusers' `Attention`: to_q / to_k / to_v (bias optional), to_out.0 (with bias).

    Self-attention when `context` is None, cross-attention otherwise. Returns (output, head-mean probs or None).
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
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
            q, k, v, self.num_heads, return_probs=return_probs, upcast=self.upcast or self.dtype != jnp.float32)
        out = Dense(x.shape[-1], axes=("heads", "embed"), name="to_out_0", **dense)(out)
        return out, probs
