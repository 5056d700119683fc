"""diffusers' `Transformer2DModel` (SD's SpatialTransformer) and its `BasicTransformerBlock`, with recording.

Numerics (docs/reference.md, "Numerics"): the outer GroupNorm has eps 1e-6, the LayerNorms eps 1e-5, the
feed-forward is a GEGLU with the exact erf GELU, q/k/v have no bias.

LD-ZNet (docs/reference.md, "Attention pools", "attn3") extends both without changing their default behaviour: a block
built with `extra_cross_attention` adds a pre-LN cross-attention `attn3` (LayerNorm `norm_sd`) to a second context
between the text cross-attention and the feed-forward; a Transformer2DModel built with `attn_pool_size` pools a feature
map given at call time with its own `attn_pool` (AttentionPool2d) and feeds the tokens to every block's attn3.

Recording: a module is given its diffusers name (`prefix`) and the set of names whose outputs the caller asked
for (`record`); it returns the requested ones in a dict, so recording also works inside `nn.remat`.
Names recorded here: `<prefix>` (the module output, NHWC), `<prefix>.transformer_blocks.<k>` (a block's output
tokens as (B, h, w, C)) and `<prefix>.transformer_blocks.<k>.attn1|attn2` (head-averaged softmax probabilities
as (B, h, w, N_keys)).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.attention import Attention, AttentionPool2d
from vpd_jax.models.compute import Compute
from vpd_jax.models.layers import ACT_TOKENS, Conv, Dense, GroupNorm, LayerNorm, constrain, gelu_exact

Dtype = Any
Records = dict[str, jax.Array]


class GEGLU(nn.Module):
    """proj -> split into (hidden, gate) -> hidden * gelu(gate), exact GELU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(
            Dense(2 * self.features, axes=("embed", "mlp"), name="proj", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x), 2, axis=-1)
        return hidden * gelu_exact(gate)


class FeedForward(nn.Module):
    """`net.0` (GEGLU to 4x width) and `net.2` (back to the input width); `net.1` is a p=0 dropout."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return Dense(x.shape[-1], axes=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention (attn1), cross-attention to the context (attn2), feed-forward; all residual.

    With `extra_cross_attention` (LD-ZNet; docs/reference.md, "attn3") a third residual step sits between attn2 and the
    feed-forward: attn3(norm_sd(x), extra_context), with the block's heads, no q/k/v bias, bias on to_out, not gated and
    not zero-initialised. Returns (tokens, {'attn1': probs, 'attn2': probs}) with only the probabilities asked for.
    """

    num_heads: int
    head_dim: int
    upcast_attention: bool = False
    maps: frozenset[str] = frozenset()  # subset of {'attn1', 'attn2'}
    extra_cross_attention: bool = False
    compute: Compute = Compute()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array,
                 extra_context: jax.Array | None = None) -> tuple[jax.Array, Records]:
        if self.extra_cross_attention != (extra_context is not None):
            raise ValueError(f"BasicTransformerBlock {self.name}: extra_cross_attention={self.extra_cross_attention} "
                             f"but extra_context is {'missing' if extra_context is None else 'given'}")
        kw = self.compute.layer_kwargs
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, upcast=self.upcast_attention,
                    compute=self.compute)
        probs = {}
        # The residual stream is constrained to batch sharding (channels whole) after every step: the usual
        # layout between tensor-parallel layers, and without it jaxlib 0.10.2 miscompiles this block for small
        # per-device token counts on a (data, fsdp, tensor) mesh (tests/models/test_unet.py).
        h, probs["attn1"] = Attention(name="attn1", **attn)(
            LayerNorm(1e-5, name="norm1", **kw)(x), return_probs="attn1" in self.maps)
        x = constrain(x + h, ACT_TOKENS)
        h, probs["attn2"] = Attention(name="attn2", **attn)(
            LayerNorm(1e-5, name="norm2", **kw)(x), context, return_probs="attn2" in self.maps)
        x = constrain(x + h, ACT_TOKENS)
        if extra_context is not None:
            h, _ = Attention(name="attn3", **attn)(LayerNorm(1e-5, name="norm_sd", **kw)(x), extra_context)
            x = constrain(x + h, ACT_TOKENS)
        x = constrain(x + FeedForward(name="ff", **kw)(LayerNorm(1e-5, name="norm3", **kw)(x)), ACT_TOKENS)
        return x, {k: v for k, v in probs.items() if v is not None}


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv, or linear with `use_linear_projection`) -> blocks -> proj_out, + input.

    `attn_pool_size` > 0 (LD-ZNet): the call also takes `pooled_input`, a (B, h', w', C') feature map, which
    `attn_pool` (an AttentionPool2d with a learned grid of that side and this module's heads) turns into the
    tokens every block's attn3 attends to. The reference has one block per transformer; with more, each block
    gets its own attn3 over the same tokens.
    """

    prefix: str  # the diffusers module name, e.g. "up_blocks.1.attentions.0"
    num_heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    record: frozenset[str] = frozenset()
    attn_pool_size: int = 0
    compute: Compute = Compute()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array,
                 pooled_input: jax.Array | None = None) -> tuple[jax.Array, Records]:
        if (self.attn_pool_size > 0) != (pooled_input is not None):
            raise ValueError(f"{self.prefix}: attn_pool_size={self.attn_pool_size} but the feature map to pool is "
                             f"{'missing' if pooled_input is None else 'given'}")
        kw = self.compute.layer_kwargs
        extra_context = None
        if pooled_input is not None:
            extra_context = AttentionPool2d(self.attn_pool_size, self.num_heads, name="attn_pool", **kw)(pooled_input)
        batch, height, width, channels = x.shape
        inner = self.num_heads * self.head_dim
        y = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            y = Dense(inner, axes=("embed", "mlp"), name="proj_in", **kw)(y.reshape(batch, height * width, channels))
        else:
            y = Conv(inner, 1, name="proj_in", **kw)(y).reshape(batch, height * width, inner)
        y = constrain(y, ACT_TOKENS)

        records: Records = {}
        for k in range(self.num_layers):
            block = f"{self.prefix}.transformer_blocks.{k}"
            maps = frozenset(m for m in ("attn1", "attn2") if f"{block}.{m}" in self.record)
            y, probs = BasicTransformerBlock(
                self.num_heads, self.head_dim, self.upcast_attention, maps, extra_context is not None,
                self.compute, name=f"transformer_blocks_{k}")(y, context, extra_context)
            for m, p in probs.items():
                records[f"{block}.{m}"] = p.reshape(batch, height, width, p.shape[-1])
            if block in self.record:
                records[block] = y.reshape(batch, height, width, inner)

        if self.use_linear_projection:
            y = Dense(channels, axes=("mlp", "embed"), name="proj_out", **kw)(y).reshape(batch, height, width, channels)
        else:
            y = Conv(channels, 1, name="proj_out", **kw)(y.reshape(batch, height, width, inner))
        out = y + x.astype(y.dtype)
        if self.prefix in self.record:
            records[self.prefix] = out
        return out, records
