"""transformers' `CLIPTextModel` in Flax: the SD v1 (OpenAI CLIP ViT-L/14) and SD v2 (OpenCLIP ViT-H) text encoder.

Token + position embeddings, pre-LN encoder layers with causal self-attention, final LayerNorm. No attention
mask besides the causal one: VPD feeds every token, BOS and padding included, to the UNet
(docs/reference.md, "Referring model").

Parameter names mirror the transformers 4.x state dict, which is what SD checkpoints carry
(`text_model/encoder/layers_0/self_attn/q_proj/kernel`); transformers 5 saves the same tensors without the
`text_model.` prefix and the weight loader accepts both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vpd_jax.models.attention import multi_head_attention
from vpd_jax.models.layers import ACT_TOKENS, Dense, LayerNorm, constrain, gelu_exact

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # OpenAI CLIP (SD v1): x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # OpenCLIP (SD v2): transformers' "gelu" is the exact erf GELU.
    "gelu": gelu_exact,
}

# transformers' fixed eos_token_id in configs written after its PR #24773; configs before it say 2.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers `CLIPTextConfig`. Defaults are transformers 5's."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIP text config: hidden_act={self.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP text config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """Parse a `CLIPTextModel` config.json, or the `text_config` of a full `CLIPModel` config.json.

        transformers configs carry many generic fields (token ids, dtype, generation settings of old versions);
        only the architecture fields above are read, and the model type is checked.
        """
        if "text_config" in config:
            config = config["text_config"]
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"CLIP text config: model_type={model_type!r}, expected 'clip_text_model'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        return cls(**kwargs)


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
    pooled: jax.Array  # (B, D): last_hidden_state at the EOS token (transformers' pooler_output)


# openai/clip-vit-large-patch14's text tower: the SD v1.x text encoder, and VPD's refer and class-embedding CLIP.
CLIP_VIT_L14_TEXT = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with q/k/v/out projections, all with bias."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (Dense(width, axes=("embed", "heads"), name=f"{n}_proj", **kw)(x) for n in "qkv")
        out, _ = multi_head_attention(q, k, v, self.num_heads, causal=True)
        return Dense(width, axes=("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.hidden_act](Dense(self.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(x))
        return Dense(x.shape[-1], axes=("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The residual stream is batch-sharded with whole channels (see BasicTransformerBlock for why).
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = constrain(x + CLIPAttention(cfg.num_attention_heads, name="self_attn", **kw)(h), ACT_TOKENS)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return constrain(x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, name="mlp", **kw)(h), ACT_TOKENS)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        # PyTorch's nn.Embedding initialises N(0, 1).
        init = nn.initializers.normal(1.0)
        kw = dict(features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(cfg.vocab_size, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                          name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings,
                             embedding_init=nn.with_logical_partitioning(init, ("pos", "embed")),
                             name="position_embedding", **kw)(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """Holds `layers_{i}` so the parameter path is `encoder/layers_0/...`, as in transformers."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            h = CLIPEncoderLayer(self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(h)
        return h


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        encoder = CLIPEncoder(cfg, name="encoder", **kw)
        h = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(encoder(h))
        pooled = jnp.take_along_axis(h, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=h, pooled=pooled)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token whose state is the pooled output, by transformers' rule.

    Legacy configs (eos_token_id == 2) take the largest token id, which is EOS in the original CLIP vocabulary;
    newer configs take the first occurrence of eos_token_id (padding may repeat it, e.g. SD v1's tokenizer).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """input_ids (B, L) int32, L <= max_position_embeddings -> CLIPTextOutput."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel: input_ids must be (batch, length <= {self.config.max_position_embeddings}), "
                f"got shape {input_ids.shape}")
        return CLIPTextTransformer(self.config, name="text_model", dtype=self.dtype,
                                   param_dtype=self.param_dtype)(input_ids)

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)
