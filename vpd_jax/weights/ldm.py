"""CompVis (ldm) single-file Stable Diffusion checkpoints: key names -> diffusers names, and configs from shapes.

A full SD checkpoint (`v1-5-pruned-emaonly`, SD 2.x) holds the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.` and the text encoder under `cond_stage_model.`. A stand-alone VAE file (e.g.
`vae-ft-mse-840000-ema-pruned`) holds the VAE keys without prefix.

Which UNet: a training checkpoint such as `sd-v1-4-full-ema.ckpt` or `v1-5-pruned.ckpt` holds two, the trained
weights under `model.diffusion_model.` and their EMA under `model_ema.` (LitEma: the parameter name with its dots
removed, `model_ema.diffusion_modelinput_blocks00weight`), while an `-emaonly` file keeps only the EMA weights, under
`model.diffusion_model.`. `split_unet(..., copy=)` picks one: 'model' (default; the non-EMA weights of a full-EMA
file, the EMA weights of an -emaonly file) or 'model_ema' (the EMA copy; only where the file has one).

UNet layout (L = layers_per_block, levels = len(block_out_channels)):
  input_blocks.0.0                         conv_in
  input_blocks.{1 + i(L+1) + j}.0 / .1     down_blocks.i.resnets.j / .attentions.j     (j < L)
  input_blocks.{(i+1)(L+1)}.0.op           down_blocks.i.downsamplers.0.conv           (i < levels - 1)
  middle_block.0 / .1 / .2                 mid_block.resnets.0 / .attentions.0 / .resnets.1
  output_blocks.{i(L+1) + j}.0 / .1        up_blocks.i.resnets.j / .attentions.j      (j <= L)
  output_blocks.{i(L+1) + L}.{1|2}.conv    up_blocks.i.upsamplers.0.conv (.2 when the level has attention)
  time_embed.0 / .2, out.0 / .2            time_embedding.linear_1 / .linear_2, conv_norm_out / conv_out
  resnet: in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection
       -> norm1/conv1, time_emb_proj, norm2/conv2, conv_shortcut
  SpatialTransformer internals already carry the diffusers names.
VAE encoder layout:
  encoder.down.i.block.j / .downsample.conv   encoder.down_blocks.i.resnets.j / .downsamplers.0.conv
  encoder.mid.block_1 / block_2 / attn_1      encoder.mid_block.resnets.0 / resnets.1 / attentions.0
  attn_1.norm / q / k / v / proj_out          group_norm / to_q / to_k / to_v / to_out.0 (1x1 convs: linear maps)
  encoder.norm_out, resnet nin_shortcut       encoder.conv_norm_out, conv_shortcut
Keys that fit no rule keep their name, so the strict loader reports them as unexpected.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
UNET_COPIES = ("model", "model_ema")  # the `model.diffusion_model.` tensors, or the EMA copy of them

StateDict = dict[str, np.ndarray]

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "out.0": "conv_norm_out", "out.2": "conv_out"}

# SD v1 (OpenAI CLIP, 768) uses 8 heads everywhere; SD v2 (OpenCLIP, 1024) uses 64 channels per head.
SD1_CROSS_ATTENTION_DIM, SD1_HEADS = 768, 8
SD2_CROSS_ATTENTION_DIM, SD2_HEAD_DIM = 1024, 64


# A stand-alone component file has the keys without prefix; these tell it apart from a diffusers-layout file.
_UNET_BARE, _VAE_BARE = "input_blocks.", "encoder.down."


def is_ldm_unet(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith((UNET_PREFIX, _UNET_BARE)) for k in state)


def is_ldm_vae(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith((VAE_PREFIX, _VAE_BARE)) for k in state)


def _split(state: Mapping[str, np.ndarray], prefix: str, bare: str, what: str, source: str) -> StateDict:
    """The component's keys: those under `prefix` (prefix removed) in a full SD file, else a stand-alone file."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith(bare) for k in state):
        return dict(state)
    raise ValueError(f"{source}: no CompVis {what} weights (neither {prefix!r} keys nor a stand-alone {what} with "
                     f"{bare!r} keys); first keys: {sorted(state)[:5]}")


def unet_file_key(key: str, copy: str = "model") -> str:
    """The key in a full SD file of UNet tensor `key` (ldm name without prefix) in `copy` (module docstring)."""
    if copy == "model":
        return UNET_PREFIX + key
    return EMA_PREFIX + ("diffusion_model." + key).replace(".", "")


def split_unet(state: Mapping[str, np.ndarray], source: str, copy: str = "model") -> StateDict:
    """The UNet's keys (ldm names without prefix) of `copy`: 'model' or 'model_ema' (module docstring)."""
    if copy not in UNET_COPIES:
        raise ValueError(f"unknown UNet copy {copy!r}; a CompVis file holds {UNET_COPIES}")
    if copy == "model":
        return _split(state, UNET_PREFIX, _UNET_BARE, "UNet", source)
    # The EMA names lost their dots, so the `model.diffusion_model.` names say which tensor each one is.
    names = [k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)]
    if not names or not any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state):
        raise ValueError(f"{source}: no EMA copy of the UNet (needs both {UNET_PREFIX!r} and {EMA_PREFIX!r} keys, as "
                         "a full-EMA training checkpoint such as sd-v1-4-full-ema.ckpt has); this file holds one UNet: "
                         "load it as copy 'model'")
    expected = {unet_file_key(n, copy) for n in names}
    missing = sorted(expected.difference(state))
    unmatched = sorted(k for k in state if k.startswith(EMA_PREFIX + "diffusion_model") and k not in expected)
    if missing or unmatched:
        raise ValueError(f"{source}: the EMA copy does not match the {UNET_PREFIX!r} UNet: missing {missing[:5]} "
                         f"({len(missing)}), without a counterpart {unmatched[:5]} ({len(unmatched)})")
    return {n: state[unet_file_key(n, copy)] for n in names}


def split_vae(state: Mapping[str, np.ndarray], source: str) -> StateDict:
    return _split(state, VAE_PREFIX, _VAE_BARE, "VAE", source)


def _rename_module(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module of `rest` (`in_layers.0.weight` -> `norm1.weight`) when `table` knows it."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _dim(state: Mapping[str, np.ndarray], key: str, axis: int) -> int:
    if key not in state:
        raise ValueError(f"cannot infer the config: the checkpoint has no {key!r}")
    return int(state[key].shape[axis])


def _rename_all(state: Mapping[str, np.ndarray], rename: Callable[[str], str | None]) -> tuple[StateDict, dict]:
    renamed, origin = {}, {}
    for key, value in state.items():
        new = rename(key) or key
        if new in renamed:
            raise ValueError(f"keys {origin[new]!r} and {key!r} both map to {new!r}")
        renamed[new], origin[new] = value, key
    return renamed, origin


# --------------------------------------------------------------------------------------------------- UNet


def _unet_layout(state: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(levels, layers_per_block) from where the downsamplers sit: the first one follows the L resnets of level 0,
    the others come every L + 1 input blocks. Keys that break the pattern are left for the strict check."""
    resnets = {int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.in_layers\.", k))}
    ops = sorted({int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    layers = ops[0] - 1 if ops else len(resnets)
    if layers < 1:
        raise ValueError(f"not an ldm UNet state dict: resnet input_blocks {sorted(resnets)}, downsamplers {ops}")
    levels = 1
    while levels * (layers + 1) in ops:
        levels += 1
    return levels, layers


def unet_ldm_to_diffusers(state: Mapping[str, np.ndarray]) -> tuple[StateDict, dict[str, str]]:
    """Rename an ldm UNet state dict (prefix already removed). Returns (renamed, diffusers key -> ldm key)."""
    _, layers = _unet_layout(state)
    per_level = layers + 1

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
            n, part, rest = int(m[1]), int(m[2]), m[3]
            if n == 0:
                return f"conv_in.{rest}" if part == 0 else None
            level, j = divmod(n - 1, per_level)
            if j == layers:
                return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
            if part == 0:
                return f"down_blocks.{level}.resnets.{j}.{_rename_module(rest, _UNET_RESNET)}"
            return f"down_blocks.{level}.attentions.{j}.{rest}" if part == 1 else None
        if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", key):
            part, rest = int(m[1]), m[2]
            if part == 1:
                return f"mid_block.attentions.0.{rest}"
            return f"mid_block.resnets.{part // 2}.{_rename_module(rest, _UNET_RESNET)}" if part in (0, 2) else None
        if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
            level, j = divmod(int(m[1]), per_level)
            part, rest = int(m[2]), m[3]
            if part == 0:
                return f"up_blocks.{level}.resnets.{j}.{_rename_module(rest, _UNET_RESNET)}"
            if rest.startswith("conv.") and j == layers:  # an ldm Upsample; a SpatialTransformer has no `conv`
                return f"up_blocks.{level}.upsamplers.0.{rest}"
            return f"up_blocks.{level}.attentions.{j}.{rest}" if part == 1 else None
        renamed = _rename_module(key, _UNET_TOP)
        return renamed if renamed != key else None

    return _rename_all(state, rename)


def infer_unet_config(state: Mapping[str, np.ndarray]) -> dict:
    """A diffusers `UNet2DConditionModel` config dict for an ldm UNet state dict, from tensor shapes.

    Not visible in shapes and set to the SD values: norm_num_groups 32, flip_sin_to_cos, freq_shift 0,
    upcast_attention False (SD 2.1-v uses True in diffusers: pass `config=` for it). The head layout follows
    cross_attention_dim (SD v1: 8 heads; SD v2: 64 channels per head); any other width needs `config=`.
    """
    levels, layers = _unet_layout(state)
    per_level = layers + 1
    channels = [_dim(state, f"input_blocks.{1 + i * per_level}.0.out_layers.3.weight", 0) for i in range(levels)]
    down_attention = [f"input_blocks.{1 + i * per_level}.1.proj_in.weight" in state for i in range(levels)]
    up_attention = [f"output_blocks.{i * per_level}.1.proj_in.weight" in state for i in range(levels)]
    to_k = [v for k, v in state.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in state.items() if k.endswith("proj_in.weight")]
    if not to_k or not proj_in:
        raise ValueError("cannot infer the UNet config: the checkpoint has no cross-attention (attn2) layers")
    cross_attention_dim = int(to_k[0].shape[1])
    if cross_attention_dim == SD1_CROSS_ATTENTION_DIM:
        heads: int | list[int] = SD1_HEADS
    elif cross_attention_dim == SD2_CROSS_ATTENTION_DIM:
        heads = [c // SD2_HEAD_DIM for c in channels]
    else:
        raise ValueError(
            f"cannot infer the attention heads for cross_attention_dim={cross_attention_dim} (only SD v1's "
            f"{SD1_CROSS_ATTENTION_DIM} and SD v2's {SD2_CROSS_ATTENTION_DIM} are known); pass config=")
    depth = {int(m[1]) for k in state if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))}
    config = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": _dim(state, "input_blocks.0.0.weight", 1),
        "out_channels": _dim(state, "out.2.weight", 0),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,
        "use_linear_projection": proj_in[0].ndim == 2,
        "upcast_attention": False,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }
    if depth and max(depth) > 0:  # SD v1/v2 have one transformer block per attention
        config["transformer_layers_per_block"] = max(depth) + 1
    return config


# --------------------------------------------------------------------------------------------------- VAE


def vae_ldm_to_diffusers(state: Mapping[str, np.ndarray]) -> tuple[StateDict, dict[str, str]]:
    """Rename an ldm VAE state dict (prefix removed). Decoder keys keep their names (the encoder loader skips them)."""

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
            return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_rename_module(m[3], _VAE_RESNET)}"
        if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
            return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        if m := re.fullmatch(r"encoder\.mid\.block_([12])\.(.+)", key):
            return f"encoder.mid_block.resnets.{int(m[1]) - 1}.{_rename_module(m[2], _VAE_RESNET)}"
        if m := re.fullmatch(r"encoder\.mid\.attn_1\.(.+)", key):
            renamed = _rename_module(m[1], _VAE_ATTENTION)
            return f"encoder.mid_block.attentions.0.{renamed}" if renamed != m[1] else None
        if key.startswith("encoder.norm_out."):
            return "encoder.conv_norm_out." + key[len("encoder.norm_out."):]
        return None

    return _rename_all(state, rename)


def infer_vae_config(state: Mapping[str, np.ndarray]) -> dict:
    """A diffusers `AutoencoderKL` config dict for an ldm VAE state dict (norm_num_groups 32 and SiLU assumed)."""
    levels = len({m[1] for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    layers = len({m[1] for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    if not levels or not layers:
        raise ValueError("cannot infer the VAE config: no 'encoder.down.N.block.M' keys")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _dim(state, "encoder.conv_in.weight", 1),
        "latent_channels": _dim(state, "encoder.conv_out.weight", 0) // 2,
        "block_out_channels": [_dim(state, f"encoder.down.{i}.block.0.conv2.weight", 0) for i in range(levels)],
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "use_quant_conv": "quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
    }
