"""Analytic FLOP counts of the networks, written from their architecture (docs/reference.md, "Numerics",
"Segmentation model and loss"), not from XLA.

Only the dense work is counted: convolutions, linear layers and the two attention matmuls (q k^T and p v), at two
FLOPs per multiply-add. Norms, activations, softmax, resizes, the loss and the optimizer are elementwise and left
out, so XLA's count (which includes them) should come out a few per cent above these numbers, never below.

A network is a list of `Op`s in forward order. The backward pass of an op costs its forward FLOPs once for the
gradient w.r.t. its weights (or, for attention matmuls, the second operand) and once for the gradient w.r.t. its
input, each only when needed: frozen parts (the VAE) have neither, the first layer that sees data (UNet conv_in
on the stop-gradient latent, the text adapter on the fixed class embeddings) has no input gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # module path, e.g. "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.qk"
    flops: float  # forward
    weight_grad: bool = True
    input_grad: bool = True

    @property
    def backward_flops(self) -> float:
        return self.flops * (int(self.weight_grad) + int(self.input_grad))


def forward_flops(ops: Iterable[Op]) -> float:
    return float(sum(op.flops for op in ops))


def train_flops(ops: Iterable[Op], remat_prefixes: Sequence[str] = ()) -> float:
    """Forward + backward; ops under `remat_prefixes` run their forward a second time in the backward pass."""
    prefixes = tuple(remat_prefixes)
    return float(sum(op.flops + op.backward_flops + (op.flops if prefixes and op.name.startswith(prefixes) else 0)
                     for op in ops))


class _Builder:
    """Collects ops; `frozen` ops get no gradients at all."""

    def __init__(self, batch: int, frozen: bool = False):
        self.batch, self.frozen, self.ops = batch, frozen, []

    def _add(self, name: str, macs: float, weight_grad: bool = True, input_grad: bool = True):
        self.ops.append(Op(name, 2.0 * macs, weight_grad and not self.frozen, input_grad and not self.frozen))

    def conv(self, name: str, in_hw: tuple[int, int], cin: int, cout: int, kernel: int, stride: int = 1,
             pad: tuple[int, int] | None = None, input_grad: bool = True) -> tuple[int, int]:
        """Multiply-adds over the kernel taps that land inside the input (zero padding is no work, as XLA counts
        it). `pad` (before, after) per spatial side; default kernel // 2 on both. Returns the output size."""
        pad = (kernel // 2, kernel // 2) if pad is None else pad
        taps, out_hw = 1, []
        for n in in_hw:
            out = (n + pad[0] + pad[1] - kernel) // stride + 1
            taps *= sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad[0] + t < n)
            out_hw.append(out)
        self._add(name, self.batch * taps * cin * cout, input_grad=input_grad)
        return tuple(out_hw)

    def dense(self, name: str, rows: int, din: int, dout: int, input_grad: bool = True):
        """`rows` per example (tokens or pixels)."""
        self._add(name, self.batch * rows * din * dout, input_grad=input_grad)

    def attention(self, name: str, queries: int, keys: int, width: int):
        """q k^T and p v over all heads: each queries x keys x width multiply-adds per example."""
        self._add(f"{name}.qk", self.batch * queries * keys * width)
        self._add(f"{name}.pv", self.batch * queries * keys * width)

    def resnet(self, name: str, hw: tuple[int, int], cin: int, cout: int, temb: int | None):
        self.conv(f"{name}.conv1", hw, cin, cout, 3)
        if temb:
            self.dense(f"{name}.time_emb_proj", 1, temb, cout)
        self.conv(f"{name}.conv2", hw, cout, cout, 3)
        if cin != cout:
            self.conv(f"{name}.conv_shortcut", hw, cin, cout, 1)


def _transformer(b: _Builder, name: str, hw: tuple[int, int], channels: int, layers: int, context_len: int,
                 context_dim: int, context_grad: bool):
    tokens = hw[0] * hw[1]
    b.dense(f"{name}.proj_in", tokens, channels, channels)
    for k in range(layers):
        block = f"{name}.transformer_blocks.{k}"
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            b.dense(f"{block}.attn1.{proj}", tokens, channels, channels)
        b.attention(f"{block}.attn1", tokens, tokens, channels)
        b.dense(f"{block}.attn2.to_q", tokens, channels, channels)
        for proj in ("to_k", "to_v"):
            b.dense(f"{block}.attn2.{proj}", context_len, context_dim, channels, input_grad=context_grad)
        b.attention(f"{block}.attn2", tokens, context_len, channels)
        b.dense(f"{block}.attn2.to_out", tokens, channels, channels)
        b.dense(f"{block}.ff.proj", tokens, channels, 8 * channels)  # GEGLU: value and gate
        b.dense(f"{block}.ff.net_2", tokens, 4 * channels, channels)
    b.dense(f"{name}.proj_out", tokens, channels, channels)


def unet_ops(cfg: UNetConfig, latent_hw: tuple[int, int], batch: int, context_len: int,
             taps: Sequence[str] | None = None, context_grad: bool = False, prefix: str = "unet.") -> list[Op]:
    """The SD UNet; with `taps`, only the ops up to the last of them (what `output_sample=False` computes)."""
    b = _Builder(batch)
    ch0, temb = cfg.block_out_channels[0], 4 * cfg.block_out_channels[0]
    b.dense("time_embedding.linear_1", 1, ch0, temb, input_grad=False)
    b.dense("time_embedding.linear_2", 1, temb, temb)
    hw = tuple(latent_hw)
    b.conv("conv_in", hw, cfg.in_channels, ch0, cfg.conv_in_kernel, input_grad=False)
    skips, x = [ch0], ch0
    levels = len(cfg.down_block_types)
    transformer = dict(context_len=context_len, context_dim=cfg.cross_attention_dim, context_grad=context_grad)
    level_hw = [hw]
    for i, kind in enumerate(cfg.down_block_types):
        c = cfg.block_out_channels[i]
        for j in range(cfg.layers_per_block[i]):
            b.resnet(f"down_blocks.{i}.resnets.{j}", level_hw[i], x, c, temb)
            x = c
            if kind == "CrossAttnDownBlock2D":
                _transformer(b, f"down_blocks.{i}.attentions.{j}", level_hw[i], c,
                             cfg.transformer_layers_per_block[i], **transformer)
            skips.append(c)
        if i < levels - 1:
            pad = cfg.downsample_padding
            level_hw.append(b.conv(f"down_blocks.{i}.downsamplers.0", level_hw[i], c, c, 3, stride=2, pad=(pad, pad)))
            skips.append(c)
    b.resnet("mid_block.resnets.0", level_hw[-1], x, x, temb)
    _transformer(b, "mid_block.attentions.0", level_hw[-1], x, cfg.transformer_layers_per_block[-1], **transformer)
    b.resnet("mid_block.resnets.1", level_hw[-1], x, x, temb)
    for i, kind in enumerate(cfg.up_block_types):
        level = levels - 1 - i
        c = cfg.block_out_channels[level]
        for j in range(cfg.up_layers_per_block[i]):
            b.resnet(f"up_blocks.{i}.resnets.{j}", level_hw[level], x + skips.pop(), c, temb)
            x = c
            if kind == "CrossAttnUpBlock2D":
                _transformer(b, f"up_blocks.{i}.attentions.{j}", level_hw[level], c,
                             cfg.transformer_layers_per_block[level], **transformer)
        if i < levels - 1:  # nearest x2 to the next skip's size, then a 3x3 conv
            b.conv(f"up_blocks.{i}.upsamplers.0", level_hw[level - 1], c, c, 3)
    b.conv("conv_out", level_hw[0], x, cfg.out_channels, cfg.conv_out_kernel)
    ops = b.ops
    if taps is not None:
        last = max(i for i, op in enumerate(ops) for t in taps if op.name == t or op.name.startswith(t + "."))
        ops = ops[: last + 1]
    return [dataclasses.replace(op, name=prefix + op.name) for op in ops]


def _vae_mid(b: _Builder, name: str, hw: tuple[int, int], channels: int):
    b.resnet(f"{name}.resnets.0", hw, channels, channels, None)
    tokens = hw[0] * hw[1]
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        b.dense(f"{name}.attentions.0.{proj}", tokens, channels, channels)
    b.attention(f"{name}.attentions.0", tokens, tokens, channels)
    b.resnet(f"{name}.resnets.1", hw, channels, channels, None)


def vae_encoder_ops(cfg: VAEConfig, image_hw: tuple[int, int], batch: int) -> list[Op]:
    """The frozen VAE encoder + quant_conv (no gradients)."""
    b = _Builder(batch, frozen=True)
    hw = tuple(image_hw)
    b.conv("vae.encoder.conv_in", hw, cfg.in_channels, cfg.block_out_channels[0], 3)
    x = cfg.block_out_channels[0]
    for i, c in enumerate(cfg.block_out_channels):
        for j in range(cfg.layers_per_block):
            b.resnet(f"vae.encoder.down_blocks.{i}.resnets.{j}", hw, x, c, None)
            x = c
        if i < len(cfg.block_out_channels) - 1:  # pad (0, 1) on each side, then 3x3 stride 2 (the SD VAE's)
            hw = b.conv(f"vae.encoder.down_blocks.{i}.downsamplers.0", hw, c, c, 3, stride=2, pad=(0, 1))
    if cfg.mid_block_add_attention:
        _vae_mid(b, "vae.encoder.mid_block", hw, x)
    b.conv("vae.encoder.conv_out", hw, x, 2 * cfg.latent_channels, 3)
    if cfg.use_quant_conv:
        b.conv("vae.quant_conv", hw, 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
    return b.ops


def vae_decoder_ops(cfg: VAEConfig, image_hw: tuple[int, int], batch: int) -> list[Op]:
    """diffusers' `Decoder` + post_quant_conv: what VPD deletes (docs/reference.md, "VPD backbone"); counted to show
    what is not compiled."""
    b = _Builder(batch, frozen=True)
    levels = len(cfg.block_out_channels)
    hw = (image_hw[0] // 2 ** (levels - 1), image_hw[1] // 2 ** (levels - 1))
    b.conv("vae.post_quant_conv", hw, cfg.latent_channels, cfg.latent_channels, 1)
    x = cfg.block_out_channels[-1]
    b.conv("vae.decoder.conv_in", hw, cfg.latent_channels, x, 3)
    _vae_mid(b, "vae.decoder.mid_block", hw, x)
    for i, c in enumerate(reversed(cfg.block_out_channels)):
        for j in range(cfg.layers_per_block + 1):
            b.resnet(f"vae.decoder.up_blocks.{i}.resnets.{j}", hw, x, c, None)
            x = c
        if i < levels - 1:
            hw = (2 * hw[0], 2 * hw[1])
            b.conv(f"vae.decoder.up_blocks.{i}.upsamplers.0", hw, c, c, 3)
    b.conv("vae.decoder.conv_out", hw, x, cfg.in_channels, 3)
    return b.ops


def semantic_fpn_ops(level_channels: Sequence[int], level_hw: Sequence[tuple[int, int]], batch: int,
                     num_classes: int, channels: int = 256) -> list[Op]:
    """mmseg FPN neck + FPNHead (docs/reference.md, "Segmentation model and loss") on the four features, finest
    first."""
    b = _Builder(batch)
    for i, (cin, hw) in enumerate(zip(level_channels, level_hw)):
        b.conv(f"head.neck.lateral_convs.{i}", hw, cin, channels, 1)
    for i, hw in enumerate(level_hw):
        b.conv(f"head.neck.fpn_convs.{i}", hw, channels, channels, 3)
    for i, hw in enumerate(level_hw):
        for k in range(max(1, i)):  # level i: i conv + x2 upsample steps (level 0: one conv)
            b.conv(f"head.decode_head.scale_heads.{i}.{k}", (hw[0] * 2 ** k, hw[1] * 2 ** k), channels, channels, 3)
    b.conv("head.decode_head.conv_seg", level_hw[0], channels, num_classes, 1)
    return b.ops


def vpd_seg_ops(unet: UNetConfig, vae: VAEConfig, image_hw: tuple[int, int], batch: int, num_classes: int,
                taps: Sequence[str], use_attn: bool = True, fpn_channels: int = 256) -> list[Op]:
    """VPDSeg: VAE encoder, text adapter on the class embeddings, UNet up to the taps, Semantic FPN."""
    latent_hw = (image_hw[0] // 8, image_hw[1] // 8)
    adapter = _Builder(1)  # the adapter runs once on the (num_classes, D) embeddings, then is broadcast
    dim = unet.cross_attention_dim
    adapter.dense("text_adapter.fc_0", num_classes, dim, dim, input_grad=False)
    adapter.dense("text_adapter.fc_1", num_classes, dim, dim)
    levels = [(latent_hw[0] // 2 ** k, latent_hw[1] // 2 ** k) for k in range(4)]
    channels = [unet.block_out_channels[0], unet.block_out_channels[1], unet.block_out_channels[2],
                unet.block_out_channels[3]]
    if use_attn:  # maps concatenated after the 1/2 and 1/4 resolution features, as VPD
        channels[1] += num_classes
        channels[2] += num_classes
    return (vae_encoder_ops(vae, image_hw, batch) + adapter.ops
            + unet_ops(unet, latent_hw, batch, num_classes, taps=taps, context_grad=True)
            + semantic_fpn_ops(channels, levels, batch, num_classes, fpn_channels))


def unet_block_prefixes(prefix: str = "unet.") -> tuple[str, ...]:
    """The ops that per-block remat recomputes: everything inside the down, mid and up blocks."""
    return tuple(prefix + p for p in ("down_blocks.", "mid_block.", "up_blocks."))
