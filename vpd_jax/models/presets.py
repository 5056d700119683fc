"""Named architectures (UNet + VAE + CLIP text) for `config.model.arch`.

'sd15' and 'sd21' are the Stable Diffusion v1.5 / v2.1 shapes (for runs whose weights come from
`config.init`, the architecture is read from those files instead: arch 'init'). 'tiny' is an SD-shaped network
small enough to train from scratch on a CPU in minutes: the demo, smoke configs and end-to-end tests use it.
"""
from __future__ import annotations

import dataclasses

from vpd_jax.models.clip_text import CLIP_VIT_L14_TEXT, CLIPTextConfig
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import SD_VAE, VAEConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(UNetConfig(), SD_VAE, CLIP_VIT_L14_TEXT),
    "sd21": Architecture(
        UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                   upcast_attention=True),
        SD_VAE,
        # OpenCLIP ViT-H/14's text tower as diffusers ships it (the last of 24 layers dropped).
        CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                       hidden_act="gelu", eos_token_id=2)),
    "tiny": Architecture(
        # Channel counts are multiples of 16 (the depth head's GroupNorm(16) sees the finest level).
        UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=(1, 1, 1, 1), num_attention_heads=(2,) * 4,
                   cross_attention_dim=32, norm_num_groups=8),
        VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, eos_token_id=1023)),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; presets are {sorted(ARCHITECTURES)} "
                         "(or 'init' to read it from config.init)")
    return ARCHITECTURES[name]
