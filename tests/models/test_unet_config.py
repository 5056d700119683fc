"""UNetConfig parsing and the module-name listing, checked against diffusers' real module tree."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from vpd_jax.models.unet_config import UNetConfig

# The published unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = dict(SD15, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
            resnet_time_scale_shift="default", sample_size=96, upcast_attention=True, use_linear_projection=True)


def _diffusers_modules(raw: dict) -> dict:
    with torch.device("meta"):
        model = TorchUNet(**{k: v for k, v in raw.items() if not k.startswith("_")})
    return dict(model.named_modules())


@pytest.mark.parametrize("raw", [SD15, SD21], ids=["sd15", "sd21"])
def test_module_names_are_exactly_the_hookable_diffusers_modules(raw):
    config = UNetConfig.from_dict(raw)
    taps, maps = config.module_names()
    modules = _diffusers_modules(raw)
    assert set(taps) | set(maps) <= set(modules), sorted(set(taps) | set(maps) - set(modules))
    hookable = {
        n for n in modules
        if n.split(".")[-1] in ("attn1", "attn2", "conv_in", "conv_norm_out", "conv_act", "conv_out", "mid_block")
        or n.split(".")[-2:-1] in (["resnets"], ["attentions"], ["transformer_blocks"], ["downsamplers"],
                                   ["upsamplers"], ["down_blocks"], ["up_blocks"])
    }
    assert hookable == set(taps) | set(maps)
    assert len(set(taps)) == len(taps) and len(set(maps)) == len(maps)


def test_sd15_and_sd21_fields():
    sd15 = UNetConfig.from_dict(SD15)
    assert sd15 == UNetConfig()  # the defaults are SD1.5
    sd21 = UNetConfig.from_dict(SD21)
    assert sd21.num_attention_heads == (5, 10, 20, 20)  # head width 64 everywhere
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.num_attention_heads)] == [64] * 4
    assert sd21.use_linear_projection and sd21.upcast_attention and sd21.cross_attention_dim == 1024
    assert sd21.up_layers_per_block == (3, 3, 3, 3)


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"), ("act_fn", "gelu"), ("only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"), ("time_embedding_type", "fourier"), ("dropout", 0.1),
])
def test_unsupported_value_names_the_field(field, value, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(SD15, **{field: value})))
    with pytest.raises(ValueError, match=f"{field}={value!r}") as err:
        UNetConfig.from_json(path)
    assert str(path) in str(err.value)


def test_unknown_field_and_bad_block_type_are_rejected():
    with pytest.raises(ValueError, match="fancy_new_option"):
        UNetConfig.from_dict(dict(SD15, fancy_new_option=1))
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict(dict(SD15, down_block_types=["SimpleCrossAttnDownBlock2D"] + SD15["down_block_types"][1:]))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_dict(dict(SD15, attention_head_dim=[8, 8]))
    with pytest.raises(ValueError, match="not divisible by 7 attention heads"):
        UNetConfig.from_dict(dict(SD15, attention_head_dim=7))
