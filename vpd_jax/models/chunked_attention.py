"""Attention over query chunks with a flash-attention-style backward pass: what `compute.attention_query_chunk`
runs for the 'xla' kernel in the layers that record no map.

Forward: a loop over the heads and, within a head, over chunks of `chunk` queries; each step computes its
(B, chunk, Lk) scores, the softmax's row max and sum, and the output normalised after the value product (the rows'
sums divide (chunk, Dv), not (chunk, Lk)). What is kept for the backward pass is the output and each row's
log-sum-exp, (H, B, Lq): never the scores. Backward: the same loops recompute each step's probabilities from its
scores and the log-sum-exp in one pass, and with dP = dO V^T: dS = scale * P * (dP - rowsum(dO * O)), dQ = dS K,
dK += dS^T Q, dV += P^T dO (the sums over a head's chunks carried in float32). Five matrix products per step where
rematerialising the textbook core costs seven.

Shapes and layouts are chosen for XLA:CPU: one head's chunk of scores at a time (2 MiB for SD's 64x64 latent with
128-query chunks) stays in the CPU's caches between the products and the softmax, where all heads' (16 MiB) did
not; keys and values are transposed once to (D, Lk) per head, so the products over the long key axis read
contiguous rows, and the gradients of K and V are accumulated as (D, Lk), so that their products contract over
the query axis of both operands. On the 2-core EPYC, the (1, 8 heads, 4096, 40) self-attention of SD's 64x64
latent, forward and backward with 128-query chunks, took about half the time of the rematerialised core
(2026-12-07; BENCHMARKS.md has the train step).

Values and gradients are the textbook formula's up to float rounding (tests/models/test_attention.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vpd_jax.models.compute import current_matmul_precision, matmul_precision_context


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, *, scale: float, chunk: int,
                      upcast: bool = True) -> jax.Array:
    """softmax(scale * q k^T) v per head, `chunk` queries at a time; (B, L, heads * D) in and out (v's dtype out).
    The last chunk is padded with zero queries, whose rows are dropped (their cotangents are zero)."""
    batch, q_len, width = q.shape
    head_dim = width // num_heads
    count = -(-q_len // chunk)
    q = jnp.pad(q, ((0, 0), (0, count * chunk - q_len), (0, 0)))
    # (H, count, B, chunk, D): the loops run over heads, then chunks
    q_chunks = jnp.transpose(q.reshape(batch, count, chunk, num_heads, head_dim), (3, 1, 0, 2, 4))
    k_t, v_t = (jnp.transpose(t.reshape(batch, t.shape[1], num_heads, -1), (2, 0, 3, 1)) for t in (k, v))
    out_t = _attention(q_chunks, k_t, v_t, scale, upcast, current_matmul_precision())  # (H, count, B, Dv, chunk)
    out = jnp.transpose(out_t, (2, 1, 4, 0, 3)).reshape(batch, count * chunk, -1)
    return out[:, :q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q_chunks, k_t, v_t, scale: float, upcast: bool, precision: str | None):
    """(H, count, B, Dv, chunk) outputs of (H, count, B, chunk, D) query chunks and (H, B, D, Lk) keys / values."""
    return _forward(q_chunks, k_t, v_t, scale, upcast, precision)[0]


def _scores(q, k_t, upcast: bool) -> jax.Array:
    """(B, chunk, Lk) float32 scores of one head, unscaled (logits in the inputs' dtype first unless `upcast`)."""
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32) if upcast else q.dtype
    logits = jnp.einsum("bqd,bdk->bqk", q, k_t, preferred_element_type=logits_dtype)
    return logits.astype(jnp.promote_types(q.dtype, jnp.float32))


def _forward(q_chunks, k_t, v_t, scale, upcast, precision):
    del precision  # in effect already

    def one_head(head):
        q_head, k_head, v_head = head

        def one_chunk(q):
            scores = _scores(q, k_head, upcast)
            row_max = jnp.max(scores, axis=-1, keepdims=True)
            exp = jnp.exp((scores - row_max) * scale)
            row_sum = jnp.sum(exp, axis=-1, keepdims=True)
            out_t = jnp.einsum("bdk,bqk->bdq", v_head, exp.astype(v_head.dtype), preferred_element_type=exp.dtype)
            out_t = out_t / jnp.swapaxes(row_sum, -1, -2)
            return out_t.astype(v_head.dtype), (row_max * scale + jnp.log(row_sum))[..., 0]

        return jax.lax.map(one_chunk, q_head)

    out_t, log_sum_exp = jax.lax.map(one_head, (q_chunks, k_t, v_t))
    return out_t, (q_chunks, k_t, v_t, out_t, log_sum_exp)


def _backward(scale, upcast, precision, residuals, d_out_t):
    q_chunks, k_t, v_t, out_t, log_sum_exp = residuals
    wide = jnp.promote_types(q_chunks.dtype, jnp.float32)

    def one_head(head):
        q_head, k_head, v_head, out_head, lse_head, d_out_head = head
        k_wide, v_wide = k_head.astype(wide), v_head.astype(wide)

        def one_chunk(carry, chunk):
            d_k_t, d_v_t = carry
            q, out_c, lse, d_out_c = chunk  # out_c, d_out_c: (B, Dv, chunk)
            probs = jnp.exp(_scores(q, k_head, upcast) * scale - lse[..., None])
            d_out = jnp.swapaxes(d_out_c, -1, -2).astype(wide)  # (B, chunk, Dv)
            d_v_t = d_v_t + jnp.einsum("bqd,bqk->bdk", d_out, probs)
            d_probs = jnp.einsum("bqd,bdk->bqk", d_out, v_wide)
            row = jnp.sum(d_out_c.astype(wide) * out_c.astype(wide), axis=-2)[..., None]
            d_scores = probs * (d_probs - row) * scale
            d_q_t = jnp.einsum("bdk,bqk->bdq", k_wide, d_scores)
            d_k_t = d_k_t + jnp.einsum("bqd,bqk->bdk", q.astype(wide), d_scores)
            return (d_k_t, d_v_t), jnp.swapaxes(d_q_t, -1, -2).astype(q.dtype)

        zeros = (jnp.zeros(k_head.shape, wide), jnp.zeros(v_head.shape, wide))
        (d_k_t, d_v_t), d_q = jax.lax.scan(one_chunk, zeros, (q_head, out_head, lse_head, d_out_head))
        return d_q, d_k_t.astype(k_head.dtype), d_v_t.astype(v_head.dtype)

    with matmul_precision_context(precision):
        return jax.lax.map(one_head, (q_chunks, k_t, v_t, out_t, log_sum_exp, d_out_t))


_attention.defvjp(_forward, _backward)
