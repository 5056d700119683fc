"""LD-ZNet test support: PyTorch modules written from docs/reference.md ("Attention pools", "attn3"), weight
porting, tiny configs and a host-side random initialisation (compiling Flax's initialisers for a whole model costs a
minute on a CPU)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from vpd_jax.models.clip_text import CLIPTextConfig
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import VAEConfig

# A two-level SD-shaped UNet: sites down_blocks.0.attentions.0, mid_block.attentions.0, up_blocks.1.attentions.0/1.
TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), num_attention_heads=(2, 4),
                       cross_attention_dim=16, norm_num_groups=8,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_TEXT = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=12, eos_token_id=63)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def host_init(shapes, seed: int = 0) -> dict:
    """Random values for an (unboxed) tree of ShapeDtypeStructs: norm scales near 1, vectors small, matrices and
    kernels U(+-1/sqrt(fan_in)) with fan_in the product of all but the last dimension."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + rng.uniform(-0.1, 0.1, leaf.shape)
        elif len(leaf.shape) == 1:
            value = rng.uniform(-0.1, 0.1, leaf.shape)
        else:
            value = rng.uniform(-1, 1, leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


# --------------------------------------------------------------------- PyTorch modules from docs/reference.md


class QKVAttention(tnn.Module):
    """Chunk q|k|v, then heads; q and k each scaled by ch^-1/4; softmax in float32
    (docs/reference.md, "Attention pools")."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * self.n_heads, ch, length),
                              (k * scale).reshape(bs * self.n_heads, ch, length))
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class TorchAttentionPool2d(tnn.Module):
    """Mean token + learned (C, 1 + S^2) pos-emb (bicubic-resized for other sizes), qkv Conv1d, c_proj Conv1d; all
    tokens kept, returned as (B, tokens, C) (docs/reference.md, "Attention pools")."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int):
        super().__init__()
        self.positional_embedding = tnn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = tnn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = tnn.Conv1d(embed_dim, embed_dim, 1)
        self.attention = QKVAttention(embed_dim // num_heads_channels)
        self.spacial_dim = spacial_dim

    def forward(self, x):  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        pos = self.positional_embedding
        if (h, w) != (self.spacial_dim, self.spacial_dim):
            grid = pos[:, 1:].reshape(1, c, self.spacial_dim, self.spacial_dim)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.reshape(c, h * w)], dim=1)
        x = self.c_proj(self.attention(self.qkv_proj(x + pos[None])))
        return x.permute(0, 2, 1)


class CrossAttention(tnn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = tnn.Linear(query_dim, inner, bias=False)
        self.to_k = tnn.Linear(context_dim, inner, bias=False)
        self.to_v = tnn.Linear(context_dim, inner, bias=False)
        self.to_out = tnn.Sequential(tnn.Linear(inner, query_dim), tnn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(tnn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = tnn.Linear(dim, 2 * inner)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class LDBasicTransformerBlock(tnn.Module):
    """attn1 (self), attn2 (text), attn3(norm_sd(x), pooled SD tokens), GEGLU feed-forward; all pre-LN and residual
    (docs/reference.md, "attn3")."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, sd_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.attn3 = CrossAttention(dim, sd_dim, heads, dim_head)
        self.ff = tnn.Sequential(GEGLU(dim, 4 * dim), tnn.Dropout(0.0), tnn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = tnn.LayerNorm(dim), tnn.LayerNorm(dim), tnn.LayerNorm(dim)
        self.norm_sd = tnn.LayerNorm(dim)

    def forward(self, x, context, sd_tokens):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.attn3(self.norm_sd(x), sd_tokens) + x
        return self.ff(self.norm3(x)) + x


class LDSpatialTransformer(tnn.Module):
    """The outer Transformer2D (GroupNorm eps 1e-6, 1x1 conv projections, residual) around one LD block, with the
    block's attention pool over the SD feature (docs/reference.md, "Attention pools", "attn3")."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int, spacial_dim: int):
        super().__init__()
        self.norm = tnn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = tnn.Conv2d(dim, dim, 1)
        self.block = LDBasicTransformerBlock(dim, heads, dim // heads, context_dim, dim)
        self.proj_out = tnn.Conv2d(dim, dim, 1)
        self.pool = TorchAttentionPool2d(spacial_dim, dim, dim // heads)

    def forward(self, x, context, sd_feature):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(1, 2)
        y = self.block(y, context, self.pool(sd_feature))
        return self.proj_out(y.transpose(1, 2).reshape(b, c, h, w)) + x


# ------------------------------------------------------------------------------------------- weight porting


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def port_linear(m: tnn.Linear) -> dict:
    out = {"kernel": _np(m.weight).T}
    if m.bias is not None:
        out["bias"] = _np(m.bias)
    return out


def port_conv1d(m: tnn.Conv1d) -> dict:
    return {"kernel": _np(m.weight)[:, :, 0].T, "bias": _np(m.bias)}


def port_conv2d(m: tnn.Conv2d) -> dict:
    return {"kernel": _np(m.weight).transpose(2, 3, 1, 0), "bias": _np(m.bias)}


def port_norm(m) -> dict:
    return {"scale": _np(m.weight), "bias": _np(m.bias)}


def port_pool(m: TorchAttentionPool2d) -> dict:
    return {"positional_embedding": _np(m.positional_embedding).T, "qkv_proj": port_conv1d(m.qkv_proj),
            "c_proj": port_conv1d(m.c_proj)}


def port_attention(m: CrossAttention) -> dict:
    return {"to_q": port_linear(m.to_q), "to_k": port_linear(m.to_k), "to_v": port_linear(m.to_v),
            "to_out_0": port_linear(m.to_out[0])}


def port_block(m: LDBasicTransformerBlock) -> dict:
    return {"attn1": port_attention(m.attn1), "attn2": port_attention(m.attn2), "attn3": port_attention(m.attn3),
            "norm1": port_norm(m.norm1), "norm2": port_norm(m.norm2), "norm3": port_norm(m.norm3),
            "norm_sd": port_norm(m.norm_sd),
            "ff": {"net_0": {"proj": port_linear(m.ff[0].proj)}, "net_2": port_linear(m.ff[2])}}


def port_spatial_transformer(m: LDSpatialTransformer) -> dict:
    return {"norm": port_norm(m.norm), "proj_in": port_conv2d(m.proj_in), "proj_out": port_conv2d(m.proj_out),
            "transformer_blocks_0": port_block(m.block), "attn_pool": port_pool(m.pool)}


def randomize(module: tnn.Module, seed: int = 0) -> tnn.Module:
    """Perturb every parameter (LayerNorm / GroupNorm affine too), so no path is an identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()
