"""The Stable Diffusion UNet (diffusers `UNet2DConditionModel`, SD v1.x / v2.x family) in Flax, NHWC.

Besides the noise prediction it returns "taps": the outputs of any diffusers submodule named as a PyTorch
user would name it for `register_forward_hook` (`up_blocks.1.attentions.1`, `mid_block`, `conv_in`, ...),
and head-averaged cross-attention probabilities of the attention layers asked for
(`up_blocks.2.attentions.0.transformer_blocks.0.attn2`), each as (B, h, w, N_context).

Nothing is computed or kept that was not asked for: attention layers whose maps are not requested return no
probabilities (and run the kernel `compute.attention` names, in query chunks if `compute.attention_query_chunk`
says so), and with `output_sample=False` the forward stops after the block that produces the last requested tap
(XLA also drops the unused tail when the sample is computed but not used under `jax.jit`).

LD-ZNet's ZNet (docs/reference.md, "Attention pools", "attn3") is this UNet built with `attn_pools`: each named
transformer gets an attention pool and an extra cross-attention (see transformer.py), and the call passes the feature
map to pool for each of them in `pooled_inputs`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vpd_jax.models.compute import REMAT_POLICIES, Compute
from vpd_jax.models.layers import ACT_NHWC, Conv, Dense, GroupNorm, constrain
from vpd_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from vpd_jax.models.transformer import Records, Transformer2DModel
from vpd_jax.models.unet_config import UNetConfig

Dtype = Any

@flax.struct.dataclass
class UNetOutput:
    sample: jax.Array | None  # (B, H, W, out_channels); None when output_sample=False
    taps: dict[str, jax.Array]  # name -> (B, h, w, c)
    attn: dict[str, jax.Array]  # name -> (B, h, w, N_keys), head-averaged softmax probabilities


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [sin | cos] (or [cos | sin] when flipped) with freqs exp(-ln(max_period) i / (half - shift))."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """`linear_1` -> SiLU -> `linear_2`."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(Dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(x))
        return Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(x)


class _BlockBase(nn.Module):
    """Fields shared by the down, mid and up blocks."""

    prefix: str  # the diffusers module name, e.g. "up_blocks.1.attentions.0"
    config: UNetConfig
    block_index: int  # index into the per-block config tuples (down order); the mid block uses the last one
    record: frozenset[str] = frozenset()
    attn_pools: tuple[tuple[str, int], ...] = ()  # (transformer name, pool grid side), see UNet2DConditionModel
    compute: Compute = Compute()

    def _resnet(self, name: str, channels: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(channels, self.config.norm_num_groups, self.config.norm_eps, True, scale,
                             name=name, **self.compute.layer_kwargs)

    def _transformer(self, j: int, channels: int, layers: int, x: jax.Array, context: jax.Array,
                     pooled_inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, Records]:
        heads = self.config.num_attention_heads[self.block_index]
        name = f"{self.prefix}.attentions.{j}"
        return Transformer2DModel(
            name, heads, channels // heads, layers, self.config.norm_num_groups,
            self.config.use_linear_projection, self.config.upcast_attention, self.record,
            dict(self.attn_pools).get(name, 0), self.compute, name=f"attentions_{j}")(
                x, context, pooled_inputs.get(name))

    def _keep(self, records: Records, name: str, x: jax.Array):
        if name in self.record:
            records[name] = x


class DownBlock(_BlockBase):
    """CrossAttnDownBlock2D (`has_attention`) or DownBlock2D. Returns (hidden, skip states, records)."""

    has_attention: bool = True
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, pooled_inputs):
        channels = self.config.block_out_channels[self.block_index]
        records: Records = {}
        skips = []
        for j in range(self.config.layers_per_block[self.block_index]):
            x = self._resnet(f"resnets_{j}", channels)(x, temb)
            self._keep(records, f"{self.prefix}.resnets.{j}", x)
            if self.has_attention:
                x, rec = self._transformer(j, channels, self.config.transformer_layers_per_block[self.block_index],
                                           x, context, pooled_inputs)
                records.update(rec)
            x = constrain(x, ACT_NHWC)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(channels, self.config.downsample_padding, name="downsamplers_0",
                             **self.compute.layer_kwargs)(x)
            self._keep(records, f"{self.prefix}.downsamplers.0", x)
            skips.append(x)
        self._keep(records, self.prefix, x)
        return x, tuple(skips), records


class MidBlock(_BlockBase):
    """UNetMidBlock2DCrossAttn: resnets.0, then (attentions.j, resnets.j+1) once."""

    @nn.compact
    def __call__(self, x, temb, context, pooled_inputs):
        channels = x.shape[-1]
        scale = self.config.mid_block_scale_factor
        records: Records = {}
        x = self._resnet("resnets_0", channels, scale)(x, temb)
        self._keep(records, f"{self.prefix}.resnets.0", x)
        x, rec = self._transformer(0, channels, self.config.transformer_layers_per_block[-1], x, context,
                                   pooled_inputs)
        records.update(rec)
        x = self._resnet("resnets_1", channels, scale)(x, temb)
        self._keep(records, f"{self.prefix}.resnets.1", x)
        x = constrain(x, ACT_NHWC)
        self._keep(records, self.prefix, x)
        return x, records


class UpBlock(_BlockBase):
    """CrossAttnUpBlock2D (`has_attention`) or UpBlock2D; `block_index` is in down order (mirrored block).

    Each resnet consumes the latest skip state, concatenated after the hidden state on the channel axis.
    `upsample_size` is the spatial size of the next block's first skip (2x unless the input size was odd).
    """

    has_attention: bool = True
    upsample_size: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, skips, temb, context, pooled_inputs):
        channels = self.config.block_out_channels[self.block_index]
        up_index = len(self.config.block_out_channels) - 1 - self.block_index
        records: Records = {}
        for j in range(self.config.up_layers_per_block[up_index]):
            x = jnp.concatenate([x, skips[-1].astype(x.dtype)], axis=-1)
            skips = skips[:-1]
            x = self._resnet(f"resnets_{j}", channels)(x, temb)
            self._keep(records, f"{self.prefix}.resnets.{j}", x)
            if self.has_attention:
                x, rec = self._transformer(j, channels, self.config.transformer_layers_per_block[self.block_index],
                                           x, context, pooled_inputs)
                records.update(rec)
            x = constrain(x, ACT_NHWC)
        if self.upsample_size is not None:
            x = Upsample2D(channels, name="upsamplers_0", **self.compute.layer_kwargs)(x, self.upsample_size)
            self._keep(records, f"{self.prefix}.upsamplers.0", x)
        self._keep(records, self.prefix, x)
        return x, skips, records


def _block_inputs(pooled_inputs: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
    """The feature maps to pool that belong to one block (passed as a call argument, so remat sees arrays)."""
    return {name: x for name, x in pooled_inputs.items() if name.startswith(prefix)}


def _maybe_remat(cls, policy_name: str | None):
    if policy_name is None:
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy_name])


class UNet2DConditionModel(nn.Module):
    """The SD UNet. Call: (sample NHWC, timesteps (B,) or scalar, context (B, N, D), *, taps, attn_maps,
    output_sample) -> UNetOutput. `taps` and `attn_maps` are static tuples of diffusers module names
    (see `UNetConfig.module_names`); an unknown name raises an error listing the valid ones.

    `compute` (vpd_jax.models.compute): dtypes, the remat policy (applied per down/mid/up block), attention query
    chunks and kernel, matmul precision.
    `attn_pools`: ((transformer name, grid side), ...), e.g. (("mid_block.attentions.0", 6),): those transformers
    get an `attn_pool` with a learned grid of that side and an attn3 in each block (LD-ZNet injection); the call
    must then give `pooled_inputs` = {name: (B, h, w, C) feature map} for exactly these names.
    """

    config: UNetConfig = UNetConfig()
    compute: Compute = Compute()
    attn_pools: tuple[tuple[str, int], ...] = ()

    def dummy_inputs(self, batch: int = 1, size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Example (sample, timesteps, context) for init / eval_shape; the spatial size is the smallest valid one."""
        size = size or 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((batch, size, size, self.config.in_channels), jnp.float32),
                jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch, 1, self.config.cross_attention_dim), jnp.float32))

    def valid_names(self) -> tuple[list[str], list[str]]:
        return self.config.module_names()

    def _check_names(self, taps: Sequence[str], attn_maps: Sequence[str], pooled_inputs: Mapping[str, jax.Array]):
        valid_taps, valid_maps = self.valid_names()
        transformers = [n for n in valid_taps if n.split(".")[-2:-1] == ["attentions"]]
        pools = [name for name, _ in self.attn_pools]
        bad_sides = [(name, side) for name, side in self.attn_pools if not isinstance(side, int) or side < 1]
        if bad_sides:
            raise ValueError(f"attn_pools grid sides must be positive ints, got {bad_sides}")
        if sorted(pooled_inputs) != sorted(pools):
            raise ValueError(f"pooled_inputs names {sorted(pooled_inputs)} differ from the attn_pools of this UNet "
                             f"{sorted(pools)}")
        for kind, asked, valid in (("tap", taps, valid_taps), ("attention-map", attn_maps, valid_maps),
                                   ("attn_pools transformer", pools, transformers)):
            unknown = [n for n in asked if n not in set(valid)]
            if unknown:
                raise ValueError(f"unknown {kind} names {unknown} for this UNet; valid {kind} names:\n  "
                                 + "\n  ".join(valid))

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array, *,
                 taps: Sequence[str] = (), attn_maps: Sequence[str] = (), output_sample: bool = True,
                 pooled_inputs: Mapping[str, jax.Array] | None = None) -> UNetOutput:
        cfg = self.config
        taps, attn_maps = tuple(taps), tuple(attn_maps)
        pooled_inputs = dict(pooled_inputs or {})
        self._check_names(taps, attn_maps, pooled_inputs)
        wanted = frozenset(taps) | frozenset(attn_maps)
        kw = self.compute.layer_kwargs
        dtype = self.compute.dtype
        block_kw = dict(attn_pools=self.attn_pools, compute=self.compute)
        records: Records = {}

        def done() -> bool:
            return not output_sample and wanted <= records.keys()

        def result(sample_out):
            return UNetOutput(sample=sample_out, taps={n: records[n] for n in taps},
                              attn={n: records[n] for n in attn_maps})

        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], name="time_embedding", **kw)(t_emb.astype(dtype))
        context = encoder_hidden_states.astype(dtype)

        x = Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2,
                 name="conv_in", **kw)(sample.astype(dtype))
        x = constrain(x, ACT_NHWC)
        if "conv_in" in wanted:
            records["conv_in"] = x
        skips = (x,)

        down_cls = _maybe_remat(DownBlock, self.compute.remat_policy)
        n = len(cfg.down_block_types)
        for i, kind in enumerate(cfg.down_block_types):
            x, block_skips, rec = down_cls(
                f"down_blocks.{i}", cfg, i, wanted, has_attention=kind == "CrossAttnDownBlock2D",
                add_downsample=i < n - 1, name=f"down_blocks_{i}", **block_kw)(
                    x, temb, context, _block_inputs(pooled_inputs, f"down_blocks.{i}."))
            skips += block_skips
            records.update(rec)
            if done():
                return result(None)

        x, rec = _maybe_remat(MidBlock, self.compute.remat_policy)("mid_block", cfg, n - 1, wanted, name="mid_block",
                                                           **block_kw)(
            x, temb, context, _block_inputs(pooled_inputs, "mid_block."))
        records.update(rec)
        if done():
            return result(None)

        up_cls = _maybe_remat(UpBlock, self.compute.remat_policy)
        for i, kind in enumerate(cfg.up_block_types):
            consumed = cfg.up_layers_per_block[i]
            remaining = skips[:-consumed]
            upsample_size = tuple(remaining[-1].shape[1:3]) if i < n - 1 else None
            x, _, rec = up_cls(
                f"up_blocks.{i}", cfg, n - 1 - i, wanted, has_attention=kind == "CrossAttnUpBlock2D",
                upsample_size=upsample_size, name=f"up_blocks_{i}", **block_kw)(
                    x, skips[-consumed:], temb, context, _block_inputs(pooled_inputs, f"up_blocks.{i}."))
            skips = remaining
            records.update(rec)
            if done():
                return result(None)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        if "conv_norm_out" in wanted:
            records["conv_norm_out"] = x
        x = nn.silu(x)
        if "conv_act" in wanted:
            records["conv_act"] = x
        x = Conv(cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2, name="conv_out",
                 **kw)(x)
        if "conv_out" in wanted:
            records["conv_out"] = x
        return result(x if output_sample else None)
