"""Multi-head attention: one functional core, the diffusers-named `Attention` layer and LD-ZNet's `AttentionPool2d`.

The core computes attention heads-first, (B, heads, L, D), with an explicit backward pass (`_attention`, a
custom VJP: dS = P * (dP - rowsum(dO * O))). Values and gradients are those of the textbook formula; the
backward pass keeps one (B, heads, Lq, Lk) array where autodiff of the softmax keeps more (BENCHMARKS.md has
what that saves in the train step). The head-averaged softmax probabilities are returned when asked for (the
cross-attention maps), softmax in float32 always.

Other kernels (`implementation`, `map_implementation`; `vpd_jax.models.compute` lists them with their platforms):
the layers that return no probabilities may use `jax.nn.dot_product_attention` ('dot_product', or 'cudnn', its
fused GPU kernel) or JAX's Pallas TPU kernels ('splash', 'flash'; `vpd_jax.models.kernels.tpu_attention`); the
layers that return them may use our fused Pallas kernel ('pallas'; `vpd_jax.models.kernels.map_attention`), which
never writes the per-head probabilities out. None of these materialises the scores.

Otherwise the scores are materialised, (B, heads, Lq, Lk) float32 per layer, kept for the backward pass: at SD's
64x64 latent 512 MiB per image and layer. `query_chunk` bounds that, so one chunk's scores are all that exists at
once, forward and backward: our core runs `vpd_jax.models.chunked_attention` (a loop over query chunks keeping
each row's log-sum-exp, with a flash-attention-style backward pass), jax.nn.dot_product_attention a scan over query
chunks whose body is rematerialised.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.compute import (ATTENTION_KERNELS, MAP_ATTENTION_KERNELS, PALLAS_KERNELS, Compute, PallasOptions,
                                    current_matmul_precision, matmul_precision_context)
from vpd_jax.models.chunked_attention import chunked_attention
from vpd_jax.models.kernels.map_attention import map_attention
from vpd_jax.models.kernels.tpu_attention import tpu_attention
from vpd_jax.models.layers import Dense
from vpd_jax.models.resize import bicubic

Dtype = Any
# multi_head_attention's implementation -> jax.nn.dot_product_attention's (None: JAX chooses).
_DOT_PRODUCT_IMPLEMENTATIONS = {"dot_product": None, "cudnn": "cudnn"}


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
    implementation: str = "xla",
    map_implementation: str = "xla",
    query_chunk: int = 0,
    pallas: PallasOptions = PallasOptions(),
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention over (B, L, heads * head_dim) projections.

    Args:
      q, k, v: (B, Lq, H*D), (B, Lk, H*D), (B, Lk, H*Dv); heads are contiguous channel groups, as in PyTorch.
      scale: logit scale; head_dim ** -0.5 when None.
      causal: mask keys after the query position (CLIP's text encoder).
      return_probs: also return the softmax probabilities averaged over heads, (B, Lq, Lk), float32.
      upcast: compute logits and softmax in float32 (diffusers `upcast_attention`/`upcast_softmax`).
      implementation: the kernel where no probabilities are returned: 'xla' (our heads-first core), 'dot_product'
        (JAX's choice) or 'cudnn' (`jax.nn.dot_product_attention` with that implementation), 'splash' or 'flash'
        (Pallas TPU kernels).
      map_implementation: the kernel where probabilities are returned: 'xla' (our core) or 'pallas' (our fused
        Pallas kernel).
      query_chunk: > 0: where no probabilities are returned and the kernel is 'xla', 'dot_product' or 'cudnn',
        attend `query_chunk` queries at a time (module docstring) if there are more keys than that (cross-attention
        over a few tokens attends at once); the result equals full attention up to float rounding. 0: all queries
        at once. Causal attention has no chunked form: a chunk it would loop over is an error. (The Pallas kernels
        tile the queries themselves.)
      pallas: the Pallas kernels' tile sizes, and whether they run in the Pallas interpreter (any platform).
    Returns:
      (output (B, Lq, H*Dv) in v's dtype, head-averaged probabilities or None).
    """
    batch, q_len, width = q.shape
    head_dim = width // num_heads
    scale = head_dim ** -0.5 if scale is None else scale
    chunk = _effective_query_chunk(query_chunk, q_len, k.shape[1])
    if chunk and causal and not return_probs:
        raise ValueError(f"query_chunk={query_chunk} with causal attention over {q_len} queries and {k.shape[1]} keys "
                         "is not supported (it would loop over the queries); use query_chunk=0")
    query_chunk = chunk

    kernel = map_implementation if return_probs else implementation
    _check_kernel(implementation, ATTENTION_KERNELS, "attention kernel", kernel, pallas.interpret)
    _check_kernel(map_implementation, MAP_ATTENTION_KERNELS, "map attention kernel", kernel, pallas.interpret)
    if kernel in PALLAS_KERNELS:
        _check_pallas_call(kernel, causal)
    if kernel in _DOT_PRODUCT_IMPLEMENTATIONS:
        def split(t):  # (B, L, H, D), jax.nn.dot_product_attention's layout
            return t.reshape(*t.shape[:2], num_heads, t.shape[-1] // num_heads)

        kh, vh = split(k), split(v)

        def attend(queries):
            return jax.nn.dot_product_attention(queries, kh, vh, scale=scale, is_causal=causal,
                                                implementation=_DOT_PRODUCT_IMPLEMENTATIONS[kernel])

        return _by_query_chunks(attend, split(q), query_chunk, axis=1).reshape(batch, q_len, -1), None

    if kernel == "xla" and not return_probs and query_chunk:
        return chunked_attention(q, k, v, num_heads, scale=scale, chunk=query_chunk, upcast=upcast), None

    qh, kh, vh = (_heads_first(t, num_heads) for t in (q, k, v))
    precision = current_matmul_precision()
    if kernel == "pallas":
        out, probs = map_attention(qh, kh, vh, scale=scale, options=pallas)
    elif kernel in PALLAS_KERNELS:
        out, probs = tpu_attention(qh, kh, vh, kernel=kernel, scale=scale, options=pallas), None
    else:
        out, probs = _attention(qh, kh, vh, scale, causal, return_probs, upcast, precision)
    return jnp.swapaxes(out, 1, 2).reshape(batch, q_len, -1), probs


def _effective_query_chunk(query_chunk: int, q_len: int, k_len: int) -> int:
    """The chunk the layer attends its queries in, 0 for all at once: also 0 where one chunk holds every query, or
    where there are no more keys than a chunk has queries (cross-attention over a text's tokens or class
    embeddings). Per head, such a layer's scores (Lq x Lk) are then no larger than one query chunk of a
    self-attention over the same positions (chunk x Lq), and a loop over chunks of so few keys runs many small
    products whose overhead outweighs the memory it saves."""
    if not query_chunk or q_len <= query_chunk or k_len <= query_chunk:
        return 0
    return query_chunk


def _check_pallas_call(kernel: str, causal: bool) -> None:
    if causal:
        raise ValueError(f"causal attention is not supported by the {kernel!r} kernel; use 'xla'")
    precision = current_matmul_precision()
    # Mosaic, the TPU kernel compiler, takes the default and the highest matmul precision, not 'high' (bf16_3x).
    if precision is not None and jax.lax.Precision(precision) == jax.lax.Precision.HIGH:
        raise ValueError(f"matmul precision {precision!r} is not available in the Pallas kernel {kernel!r}; use "
                         "'default' or 'highest'")


def _check_kernel(name: str, kernels: dict, what: str, running: str, interpret: bool) -> None:
    """`name` is one of `kernels` (kernel -> the platform it needs); if it is the kernel `running`, this platform
    has it (or `interpret` runs it, a Pallas kernel, in the interpreter)."""
    if name not in kernels:
        raise ValueError(f"unknown {what} {name!r}; valid: {tuple(kernels)}")
    platform = jax.default_backend()
    needed = kernels[name]
    if name != running or needed in (None, platform) or (interpret and name in PALLAS_KERNELS):
        return
    here = tuple(kernel for kernel, needs in kernels.items() if needs in (None, platform))
    hint = " (or pallas_interpret=True: the Pallas interpreter, slow, for tests)" if name in PALLAS_KERNELS else ""
    raise ValueError(f"{what} {name!r} runs on {needed.upper()}s only; on this {platform!r} platform use one of "
                     f"{here}{hint}")


def _heads_first(t: jax.Array, num_heads: int) -> jax.Array:
    """(B, L, H*D) -> (B, H, L, D)."""
    batch, length, width = t.shape
    return jnp.swapaxes(t.reshape(batch, length, num_heads, width // num_heads), 1, 2)


def _by_query_chunks(attend, queries: jax.Array, chunk: int, axis: int) -> jax.Array:
    """attend(queries) over the queries of `queries` (their positions along `axis`), `chunk` at a time, as a scan
    whose body is rematerialised (all at once when chunk is 0: `_effective_query_chunk` decides). The last chunk is
    padded with zero queries, whose rows are dropped (softmax rows are independent). The result has the queries
    along `axis`."""
    q_len = queries.shape[axis]
    if not chunk:
        return attend(queries)
    count = -(-q_len // chunk)
    pad = [(0, 0)] * queries.ndim
    pad[axis] = (0, count * chunk - q_len)
    queries = jnp.pad(queries, pad)
    shape = queries.shape[:axis] + (count, chunk) + queries.shape[axis + 1:]
    chunks = jnp.moveaxis(queries.reshape(shape), axis, 0)
    _, out = jax.lax.scan(jax.checkpoint(lambda carry, part: (carry, attend(part))), None, chunks)
    out = jnp.moveaxis(out, 0, axis)
    out = out.reshape(out.shape[:axis] + (count * chunk,) + out.shape[axis + 2:])
    return jax.lax.slice_in_dim(out, 0, q_len, axis=axis)


def _probabilities(qh, kh, scale: float, causal: bool, upcast: bool) -> jax.Array:
    """softmax(scale * q k^T) over the keys, (B, H, Lq, Lk) in float32 (or wider inputs' dtype); masked keys get
    probability 0."""
    softmax_dtype = jnp.promote_types(qh.dtype, jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=softmax_dtype if upcast else qh.dtype)
    logits = logits * scale
    if causal:
        allowed = jnp.tril(jnp.ones(logits.shape[-2:], dtype=bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits.astype(softmax_dtype), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attention(qh, kh, vh, scale: float, causal: bool, return_probs: bool, upcast: bool, precision: str | None):
    """(B, H, Lq, Dv) output in v's dtype, and (B, Lq, Lk) head-mean probabilities or None. `precision`: the
    matmul precision the forward pass is traced under, for tracing the backward pass (`current_matmul_precision`)."""
    return _attention_forward(qh, kh, vh, scale, causal, return_probs, upcast, precision)[0]


def _attention_forward(qh, kh, vh, scale, causal, return_probs, upcast, precision):
    del precision  # in effect already
    probs = _probabilities(qh, kh, scale, causal, upcast)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(vh.dtype), vh)
    return (out, probs.mean(axis=1) if return_probs else None), (qh, kh, vh, probs, out)


def _attention_backward(scale, causal, return_probs, upcast, precision, residuals, cotangents):
    """With P the probabilities and dP = dO V^T (+ the head-mean map's cotangent / H): dV = P^T dO,
    dS = scale * P * (dP - rowsum(P * dP)), dQ = dS K, dK = dS^T Q. Without a map cotangent rowsum(P * dP) is
    rowsum(dO * O), a pass over (Lq, Dv) instead of (Lq, Lk). Traced under the forward pass's matmul precision."""
    del causal, upcast  # masked positions have P = 0, hence dS = 0
    qh, kh, vh, probs, out = residuals
    d_out, d_map = cotangents
    wide = probs.dtype  # float32, or the inputs' dtype if wider
    with matmul_precision_context(precision):
        d_v = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out.astype(wide)).astype(vh.dtype)
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, vh, preferred_element_type=wide)
        if return_probs:
            d_probs = d_probs + d_map[:, None].astype(wide) / probs.shape[1]
            row = jnp.sum(probs * d_probs, axis=-1, keepdims=True)
        else:
            row = jnp.sum(d_out.astype(wide) * out.astype(wide), axis=-1, keepdims=True)
        d_logits = probs * (d_probs - row) * scale
        d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, kh.astype(wide)).astype(qh.dtype)
        d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, qh.astype(wide)).astype(kh.dtype)
    return d_q, d_k, d_v


_attention.defvjp(_attention_forward, _attention_backward)


class Attention(nn.Module):
    """diffusers' `Attention`: to_q / to_k / to_v (bias optional), to_out.0 (with bias).

    Self-attention when `context` is None, cross-attention otherwise. Returns (output, head-mean probs or None).
    `compute.attention` and `compute.attention_query_chunk` choose how the layer attends when it returns no
    probabilities, `compute.map_attention` when it returns them (`multi_head_attention`'s `implementation`,
    `query_chunk` and `map_implementation`; `compute.pallas` its `pallas`).
    """

    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    compute: Compute = Compute()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, return_probs: bool = False):
        inner = self.num_heads * self.head_dim
        context = x if context is None else context
        dense = self.compute.layer_kwargs
        q = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_q", **dense)(x)
        k = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_k", **dense)(context)
        v = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name="to_v", **dense)(context)
        out, probs = multi_head_attention(
            q, k, v, self.num_heads, return_probs=return_probs,
            upcast=self.upcast or self.compute.dtype != jnp.float32, implementation=self.compute.attention,
            map_implementation=self.compute.map_attention, query_chunk=self.compute.attention_query_chunk,
            pallas=self.compute.pallas)
        out = Dense(x.shape[-1], axes=("heads", "embed"), name="to_out_0", **dense)(out)
        return out, probs


class AttentionPool2d(nn.Module):
    """LD-ZNet's attention pool over a (B, h, w, C) feature map (docs/reference.md, "Attention pools"), keeping
    every token.

    Tokens are the spatial mean followed by the h*w positions (row-major), plus a learned positional embedding
    for a `spatial_dim` x `spatial_dim` grid (stored as (1 + S*S, C), the reference's (C, tokens) transposed).
    Other grid sizes use the spatial part bicubic-resized with PyTorch's kernel (a = -0.75,
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
