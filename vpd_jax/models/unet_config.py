"""The SD UNet configuration, parsed from a diffusers `UNet2DConditionModel` config.json, and its module names.

Covers the SD v1.x / v2.x family. Every diffusers field is either used, or required to hold the value that
SD uses; any other value is rejected with an error naming the field, rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
# The UNet's noise-prediction head after the last up block: tap names, and the ones that hold parameters. A UNet used
# as a feature extractor (VPD, the probes, LD-ZNet's frozen branch) never runs it.
OUTPUT_HEAD = ("conv_norm_out", "conv_act", "conv_out")
OUTPUT_HEAD_PARAMS = ("conv_norm_out", "conv_out")

# Fields that describe the checkpoint but do not change the network.
_INFORMATIONAL = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "_use_default_values"}

# diffusers fields whose value must be SD's: anything else would need code we do not have.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "dropout": (0.0, 0),
    "act_fn": ("silu",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_block(name: str, value: Any, num_blocks: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * num_blocks
    value = tuple(value)
    if len(value) != num_blocks or not all(isinstance(v, int) for v in value):
        raise ValueError(f"UNet config field {name!r}: expected an int or {num_blocks} ints, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The network-defining fields, normalised to one value per down block where diffusers allows lists.

    `num_attention_heads` is what diffusers derives from `attention_head_dim` (a historical misnomer: for SD it
    holds the number of heads, 8 for SD1, (5, 10, 20, 20) for SD2); the head width is channels // heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "UNet config") -> "UNetConfig":
        """Parse a diffusers config dict; `source` (e.g. the file path) is named in every error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | _INFORMATIONAL | set(_REQUIRED_VALUES) | {"attention_head_dim"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{source}: unsupported UNet config fields {unknown}")
        for name, allowed in _REQUIRED_VALUES.items():
            if name in raw and raw[name] not in allowed:
                raise ValueError(
                    f"{source}: unsupported value {name}={raw[name]!r} (supported: {', '.join(map(repr, allowed))})")

        values = {k: raw[k] for k in fields & set(raw)}
        values.pop("num_attention_heads", None)  # must be None (checked above); derived from attention_head_dim
        down = tuple(values.pop("down_block_types", cls.down_block_types))
        up = tuple(values.pop("up_block_types", cls.up_block_types))
        _check_block_types(source, "down_block_types", down, DOWN_BLOCK_TYPES)
        _check_block_types(source, "up_block_types", up, UP_BLOCK_TYPES)
        mid = values.pop("mid_block_type", cls.mid_block_type)
        if mid not in MID_BLOCK_TYPES:
            raise ValueError(f"{source}: unsupported value mid_block_type={mid!r} (supported: {MID_BLOCK_TYPES})")
        n = len(down)
        if len(up) != n:
            raise ValueError(f"{source}: {n} down blocks but {len(up)} up blocks")
        channels = _per_block("block_out_channels", values.pop("block_out_channels", cls.block_out_channels), n)
        heads = raw.get("attention_head_dim", 8)
        cross_dim = values.pop("cross_attention_dim", cls.cross_attention_dim)
        if not isinstance(cross_dim, int):
            raise ValueError(f"{source}: cross_attention_dim must be one int for SD UNets, got {cross_dim!r}")
        config = cls(
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            block_out_channels=channels,
            layers_per_block=_per_block("layers_per_block", values.pop("layers_per_block", 2), n),
            num_attention_heads=_per_block("attention_head_dim", heads, n),
            transformer_layers_per_block=_per_block(
                "transformer_layers_per_block", values.pop("transformer_layers_per_block", 1), n),
            cross_attention_dim=cross_dim,
            **values,
        )
        for c, h in zip(config.block_out_channels, config.num_attention_heads):
            if c % h:
                raise ValueError(f"{source}: {c} channels are not divisible by {h} attention heads")
            if c % config.norm_num_groups:
                raise ValueError(f"{source}: {c} channels are not divisible into {config.norm_num_groups} groups")
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "UNetConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    # ----- derived structure, shared by the model and the name listing -----------------------------------------

    @property
    def up_layers_per_block(self) -> tuple[int, ...]:
        """Resnets per up block: one more than the mirrored down block (it also consumes the downsampler skip)."""
        return tuple(n + 1 for n in reversed(self.layers_per_block))

    def module_names(self) -> tuple[list[str], list[str]]:
        """(tap names, attention-map names) in forward order: every diffusers module a forward hook could observe.

        Tap names are module outputs in NHWC; map names are the attn1/attn2 layers whose head-averaged
        probabilities can be returned.
        """
        taps, maps = ["conv_in"], []

        def transformer(path: str, layers: int):
            taps.append(path)
            for k in range(layers):
                block = f"{path}.transformer_blocks.{k}"
                taps.append(block)
                maps.extend([f"{block}.attn1", f"{block}.attn2"])

        n = len(self.down_block_types)
        for i, kind in enumerate(self.down_block_types):
            for j in range(self.layers_per_block[i]):
                taps.append(f"down_blocks.{i}.resnets.{j}")
                if kind == "CrossAttnDownBlock2D":
                    transformer(f"down_blocks.{i}.attentions.{j}", self.transformer_layers_per_block[i])
            if i < n - 1:
                taps.append(f"down_blocks.{i}.downsamplers.0")
            taps.append(f"down_blocks.{i}")
        taps.append("mid_block.resnets.0")
        transformer("mid_block.attentions.0", self.transformer_layers_per_block[-1])
        taps.extend(["mid_block.resnets.1", "mid_block"])
        up_transformer_layers = tuple(reversed(self.transformer_layers_per_block))
        for i, kind in enumerate(self.up_block_types):
            for j in range(self.up_layers_per_block[i]):
                taps.append(f"up_blocks.{i}.resnets.{j}")
                if kind == "CrossAttnUpBlock2D":
                    transformer(f"up_blocks.{i}.attentions.{j}", up_transformer_layers[i])
            if i < n - 1:
                taps.append(f"up_blocks.{i}.upsamplers.0")
            taps.append(f"up_blocks.{i}")
        taps.extend(OUTPUT_HEAD)
        return taps, maps


def _check_block_types(source: str, name: str, value: tuple[str, ...], supported: tuple[str, ...]):
    bad = [v for v in value if v not in supported]
    if bad:
        raise ValueError(f"{source}: unsupported value {name} entries {bad} (supported: {supported})")
