"""A tiny PyTorch LD-ZNet with the original's module names and forward order (koutilya-pnvr/LD-ZNet: `LatentSeg`
in ldm_seg/models/ldznet/ldznet_model.py, ZNet in ldm_seg/modules/diffusionmodules/ldznet_UNet.py, the injected
SpatialTransformer / BasicTransformerBlock in ldm_seg/modules/ldznet_attention.py, `FrozenSDUNet` in
ldm_seg/modules/encoders/modules.py), written from the facts of that code, and its released Lightning checkpoint.

The UNets are diffusers modules with LD-ZNet's SpatialTransformer (ldm names: `attentionpool2D`, `attn3`, `norm_sd`)
in place of the transformers at the injection sites, saved under ldm names (the tests' diffusers -> ldm mapping).
The randomness (VAE sample noise, SD timesteps and noise), which the original draws itself, is an input here.
ZNet runs with the EMA weights, as the original's prediction (`ema_scope`); the file's live weights differ.
"""
from __future__ import annotations

import collections

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.original_vpd import (TINY, ScheduleBuffers, diffusers_unet_config, diffusers_vae_config, randomize_,
                                        tiny_clip)
from tests.models.ldznet_reference import GEGLU, LDBasicTransformerBlock, TorchAttentionPool2d
from tests.reference_models import unet_diffusers_to_ldm, vae_diffusers_to_ldm
from vpd_jax.models.ldznet import grid_side, injection_sites, site_level

LATENT_SCALE = 0.18215


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(LDBasicTransformerBlock):
    """ldznet_attention.BasicTransformerBlock: attn1, attn2 (text), attn3(norm_sd(x), SD tokens), ff, with ldm's
    FeedForward names (`ff.net.0.proj`, `ff.net.2`)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__(dim, heads, dim // heads, context_dim, dim)
        self.ff = FeedForward(dim)


class SpatialTransformer(nn.Module):
    """ldznet_attention.SpatialTransformer, called as diffusers calls its Transformer2DModel; the SD feature of
    this site is set on `sd_features` before the UNet runs (the original passes it down the call)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, spacial_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.attentionpool2D = TorchAttentionPool2d(spacial_dim, channels, channels // heads)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.sd_features = None

    def forward(self, hidden_states, encoder_hidden_states=None, return_dict=False, **kwargs):
        b, c, h, w = hidden_states.shape
        x = self.proj_in(self.norm(hidden_states)).reshape(b, c, h * w).transpose(1, 2)
        sd_tokens = self.attentionpool2D(self.sd_features)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states, sd_tokens)
        return (self.proj_out(x.transpose(1, 2).reshape(b, c, h, w)) + hidden_states,)


def _final() -> nn.Sequential:
    """ldznet_UNet's `final`: [Conv3x3, SiLU, ConvT k2 s2, SiLU] x 3, Conv3x3, one channel."""
    layers = []
    for _ in range(3):
        layers += [nn.Conv2d(1, 1, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(1, 1, 2, stride=2), nn.SiLU()]
    return nn.Sequential(*layers, nn.Conv2d(1, 1, 3, padding=1))


def _module(root: nn.Module, name: str) -> nn.Module:
    return dict(root.named_modules())[name]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, last = name.split(".")
    setattr(_module(root, ".".join(parents)), last, module)


class Wrapper(nn.Module):
    """ldm's DiffusionWrapper: the UNet under `diffusion_model`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


class FrozenSDModel(nn.Module):
    """The LatentDiffusion inside FrozenSDUNet (first and cond stage deleted): its UNet and noise schedule."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.model = Wrapper(unet)
        self.schedule = ScheduleBuffers()


class FrozenSDUNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.model = FrozenSDModel(unet)


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.transformer = clip


class LatentSeg(nn.Module):
    """LatentSeg's prediction path: z = 0.18215 * VAE sample; c = CLIP(tokens); SD features of q_sample(z, t) at
    the injection sites; logits = final(SiLU(ZNet(z, t=0, c)))."""

    def __init__(self, image_size: int = 64, seed: int = 0, arch=TINY):
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.manual_seed(seed)
        self.sites = injection_sites(arch.unet)
        znet = UNet2DConditionModel(**{**diffusers_unet_config(arch), "out_channels": 1})
        latent = image_size // 8
        for name in self.sites:
            channels = arch.unet.block_out_channels[site_level(arch.unet, name)]
            heads = arch.unet.num_attention_heads[site_level(arch.unet, name)]
            _replace(znet, name, SpatialTransformer(channels, heads, arch.unet.cross_attention_dim,
                                                    arch.unet.norm_num_groups,
                                                    grid_side(latent, site_level(arch.unet, name))))
        znet.final = _final()
        self.model = Wrapper(znet)
        self.first_stage_model = AutoencoderKL(**diffusers_vae_config(arch))
        self.cond_stage_model = FrozenCLIPEmbedder(tiny_clip(seed + 3, arch))
        self.sd_features_stage_model = FrozenSDUNet(UNet2DConditionModel(**diffusers_unet_config(arch)))
        randomize_(self, seed + 1)

    def forward(self, images, token_ids, vae_noise, timesteps, sd_noise):
        """images (B, 3, H, W) in [-1, 1]; the noise NCHW; timesteps (B,) -> logits (B, 1, H, W)."""
        posterior = self.first_stage_model.encode(images).latent_dist
        z = (posterior.mean + posterior.std * vae_noise) * LATENT_SCALE
        c = self.cond_stage_model.transformer(input_ids=token_ids).last_hidden_state
        schedule = self.sd_features_stage_model.model.schedule
        z_t = (schedule.sqrt_alphas_cumprod[timesteps][:, None, None, None] * z
               + schedule.sqrt_one_minus_alphas_cumprod[timesteps][:, None, None, None] * sd_noise)
        sd_unet = self.sd_features_stage_model.model.model.diffusion_model
        features, handles = {}, []
        for name in self.sites:
            def hook(_module, _inputs, output, name=name):
                features[name] = output[0] if isinstance(output, tuple) else output.sample
            handles.append(_module(sd_unet, name).register_forward_hook(hook))
        try:
            sd_unet(z_t, timesteps, c)
        finally:
            for h in handles:
                h.remove()
        znet = self.model.diffusion_model
        for name in self.sites:
            _module(znet, name).sd_features = features[name]
        out = znet(z, torch.zeros_like(timesteps), c).sample
        self.znet_sample = out  # ZNet's 1-channel output before the SiLU, kept for the tests
        return znet.final(F.silu(out))  # `out` ends in a SiLU after conv_out


# ------------------------------------------------------------------------------------------------ the file


def ema_key(ldm_key: str) -> str:
    """LitEma's buffer of `model.diffusion_model.<name>`: the name under the wrapper with the dots removed."""
    return "model_ema." + ldm_key[len("model."):].replace(".", "")


def save_lightning(model: LatentSeg, path: str, live_offset: float = 0.05, seed: int = 0) -> dict:
    """The Lightning checkpoint of LatentSeg: ZNet's EMA copy (the weights `model` runs) in LitEma's buffers, its
    live weights (EMA + an offset) under model.diffusion_model, the frozen SD UNet, VAE (decoder included), CLIP
    (transformers 4.x names, with its position-id buffer) and the noise-schedule buffers."""
    znet = {k: v for k, v in model.model.diffusion_model.state_dict().items()}
    final = {f"model.diffusion_model.{k}": v for k, v in znet.items() if k.startswith("final.")}
    ema = {**unet_diffusers_to_ldm({k: v for k, v in znet.items() if not k.startswith("final.")},
                                   TINY.unet.layers_per_block[0], prefix="model.diffusion_model."), **final}
    g = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    state.update({k: v + live_offset * torch.randn(v.shape, generator=g) for k, v in ema.items()})
    state.update({ema_key(k): v for k, v in ema.items()})
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd_model = model.sd_features_stage_model.model
    state.update(unet_diffusers_to_ldm(sd_model.model.diffusion_model.state_dict(), TINY.unet.layers_per_block[0],
                                       prefix="sd_features_stage_model.model.model.diffusion_model."))
    schedule = {k: v for k, v in sd_model.schedule.state_dict().items() if k != "lvlb_weights"}  # non-persistent
    state.update({f"sd_features_stage_model.model.{k}": v for k, v in schedule.items()})
    state.update(schedule)
    state.update(vae_diffusers_to_ldm(model.first_stage_model.state_dict(), prefix="first_stage_model."))
    clip = model.cond_stage_model.transformer.state_dict()
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip.items()})
    positions = clip["embeddings.position_embedding.weight"].shape[0]
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, path)
    return state


def numpy_noise(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
