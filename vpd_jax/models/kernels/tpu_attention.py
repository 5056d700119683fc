"""JAX's Pallas TPU attention kernels behind `compute.attention`: 'splash' (splash attention) and 'flash' (the
older flash attention kernel), for the layers that record no map.

Both compute the logits and the softmax in float32 and keep no (Lq, Lk) array: an online softmax over key tiles,
forward and backward. Sequences and head widths are padded to the kernels' tiles (`tiles`); padded keys are masked
with segment ids (queries 1, real keys 1, padded keys 0), so every query row keeps its real keys.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as flash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from vpd_jax.models.compute import PallasOptions, current_matmul_precision, matmul_precision_context
from vpd_jax.models.kernels import tiles
from vpd_jax.models.kernels.sharding import device_axes


def tpu_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, *, kernel: str, scale: float,
                  options: PallasOptions) -> jax.Array:
    """softmax(scale q k^T) v by `kernel` ('splash' or 'flash') over heads-first (B, H, L, D) arrays; returns
    (B, H, Lq, Dv) in v's dtype."""
    if kernel not in _KERNELS:
        raise ValueError(f"unknown TPU attention kernel {kernel!r}; valid: {tuple(_KERNELS)}")
    batch, heads, q_len, _ = qh.shape
    kv_len, v_dim = kh.shape[2], vh.shape[3]
    width = tiles.padded_width(qh.shape[3], v_dim)
    block_q, q_padded = tiles.tile(options.block_q, q_len)
    block_kv, kv_padded = tiles.tile(options.block_kv, kv_len)
    q = tiles.pad(qh, q_padded, width)
    k = tiles.pad(kh, kv_padded, width)
    v = tiles.pad(vh, kv_padded, width)
    run = functools.partial(_KERNELS[kernel], scale=scale, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                            interpret=options.interpret)
    run = _backward_traced_like_forward(run, current_matmul_precision(), options.interpret and kernel == "flash")
    spec = device_axes(batch, heads)
    if spec is not None:
        run = jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    return run(q, k, v)[:, :, :q_len, :v_dim].astype(vh.dtype)


def _key_segments(kv_padded: int, kv_len: int) -> jax.Array:
    """1 for the real keys, 0 for the padding."""
    return (jnp.arange(kv_padded) < kv_len).astype(jnp.int32)


def _splash(q, k, v, *, scale, kv_len, block_q, block_kv, interpret):
    """Splash attention of padded (B, H, L, W) arrays, one batch element at a time (its kernel's unit)."""
    heads, q_padded, kv_padded = q.shape[1], q.shape[2], k.shape[2]
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q_padded, kv_padded))] * heads)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = None
    if kv_padded != kv_len:
        segments = splash.SegmentIds(q=jnp.ones((q_padded,), jnp.int32), kv=_key_segments(kv_padded, kv_len))
    # The splash kernel takes no logit scale: the queries come scaled.
    return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q * scale, k, v, segments)


def _flash(q, k, v, *, scale, kv_len, block_q, block_kv, interpret):
    """The flash attention kernel over padded (B, H, L, W) arrays (`interpret` is applied by the caller's scope:
    this kernel has no switch of its own)."""
    del interpret
    batch, _, q_padded, _ = q.shape
    kv_padded = k.shape[2]
    blocks = flash.BlockSizes(block_q=block_q, block_k_major=block_kv, block_k=block_kv, block_b=1,
                              block_q_major_dkv=block_q, block_k_major_dkv=block_kv, block_k_dkv=block_kv,
                              block_q_dkv=block_q, block_k_major_dq=block_kv, block_k_dq=block_kv, block_q_dq=block_q)
    segments = None
    if kv_padded != kv_len:
        segments = flash.SegmentIds(q=jnp.ones((batch, q_padded), jnp.int32),
                                    kv=jnp.broadcast_to(_key_segments(kv_padded, kv_len), (batch, kv_padded)))
    return flash.flash_attention(q, k, v, segment_ids=segments, sm_scale=scale, block_sizes=blocks)


_KERNELS = {"splash": _splash, "flash": _flash}


def _backward_traced_like_forward(fn, precision: str | None, force_interpret: bool):
    """`fn(q, k, v)` whose forward and backward passes are both traced under the matmul precision `precision` and,
    with `force_interpret`, with every Pallas call interpreted.

    The kernels' backward passes are custom VJPs, traced when JAX transposes the model: after the forward pass has
    left the model's precision scope (`Compute.trace_scope`), so they would otherwise run at the platform's
    default precision. The flash kernel has no interpreter switch: `pltpu.force_tpu_interpret_mode(True)` (the
    generic interpreter, as `interpret=True` gives the splash kernel) must cover its backward tracing too.
    """
    def scope():
        stack = contextlib.ExitStack()
        stack.enter_context(matmul_precision_context(precision))
        if force_interpret:
            stack.enter_context(pltpu.force_tpu_interpret_mode(True))
        return stack

    @jax.custom_vjp
    def traced(q, k, v):
        with scope():
            return fn(q, k, v)

    def forward(q, k, v):
        with scope():
            return jax.vjp(fn, q, k, v)

    def backward(vjp, d_out):
        with scope():
            return vjp(d_out)

    traced.defvjp(forward, backward)
    return traced

