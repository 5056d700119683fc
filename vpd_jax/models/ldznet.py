"""ZNet and LD-ZNet: text-based segmentation on the Stable Diffusion latent (the original: docs/reference.md,
"LD-ZNet" and the sections under it).

image in [-1, 1] -> VAE posterior *sample* x 0.18215 (docs/reference.md, "LD-ZNet at a glance") = z -> CLIP tokens
-> c (B, L, D)
  ZNet     the SD UNet at t = 0 on the clean z with context c, one output channel, an extra SiLU, and a learned 8x
           upsampler (`head`, the reference's `final`) -> (B, H, W, 1) logits at the image resolution
           (docs/reference.md, "ZNet").
  LD-ZNet  also runs the frozen SD UNet on z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps with t ~ U[300, 500) per
           sample and the same c, not an empty prompt (docs/reference.md, "Frozen SD branch"); its five
           1280-channel transformer outputs are taken under stop_gradient, each pooled by its own AttentionPool2d
           and attended to by an extra cross-attention (attn3) in the ZNet transformer at the same position, not
           one pooled feature shared by all (docs/reference.md, "Injection sites", "Attention pools", "attn3").
           The frozen pass stops after the last tap (`output_sample=False`).

Parameter tree (what the `ldznet` optimizer preset matches): `vae`, `text_encoder`, `sd_unet` (frozen; LD-ZNet only,
and only the part before the last tap), `znet` (the SD-initialised UNet with `attentions_j/attn_pool` and
`transformer_blocks_0/{norm_sd, attn3}` at the injection sites), `head` (`final_0` ... `final_12`, the reference's
Sequential indices). `params_from_sd` builds the pretrained part of this tree from SD weights
(docs/reference.md, "ZNet initialisation").

Randomness is explicit: the call takes one PRNG key per example (VAE sample, SD timestep, SD noise), so an
example's prediction does not depend on its batch or host.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models.clip_text import CLIP_VIT_L14_TEXT, CLIPTextConfig, CLIPTextModel
from vpd_jax.models.compute import Compute
from vpd_jax.models.diffusion import LATENT_SCALE, NoiseSchedule, draw_timesteps, q_sample
from vpd_jax.models.heads.common import ConvTranspose
from vpd_jax.models.layers import Conv
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import OUTPUT_HEAD_PARAMS, UNetConfig
from vpd_jax.models.vae import SD_VAE, AutoencoderKLEncoder, VAEConfig

Dtype = Any

TIMESTEP_MODES = ("uniform", "mean")
# What LD-ZNet adds inside the ZNet UNet (docs/reference.md, "Attention pools", "attn3").
NEW_MODULES = ("attn_pool", "attn3", "norm_sd")


# ------------------------------------------------------------------------------------------ injection sites


def injection_sites(config: UNetConfig) -> tuple[str, ...]:
    """The transformers LD-ZNet injects into (docs/reference.md, "Injection sites"): the last transformer of the
    deepest cross-attention down block, the mid block's, and every transformer of the up block that mirrors that down
    block. For SD v1 these are down_blocks.2.attentions.1, mid_block.attentions.0 and up_blocks.1.attentions.0/1/2
    (1-based SA 6-10)."""
    deepest = max(i for i, kind in enumerate(config.down_block_types) if kind == "CrossAttnDownBlock2D")
    n = len(config.down_block_types)
    up = n - 1 - deepest
    if config.up_block_types[up] != "CrossAttnUpBlock2D":
        raise ValueError(f"up_blocks.{up} (mirroring down_blocks.{deepest}) has no attention: {config.up_block_types}")
    return (f"down_blocks.{deepest}.attentions.{config.layers_per_block[deepest] - 1}",
            "mid_block.attentions.0",
            *(f"up_blocks.{up}.attentions.{j}" for j in range(config.up_layers_per_block[up])))


def site_level(config: UNetConfig, name: str) -> int:
    """How many 2x downsamplings precede a transformer (0 = latent resolution)."""
    n = len(config.down_block_types)
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return n - 1
    if parts[0] == "up_blocks":
        return n - 1 - int(parts[1])
    raise ValueError(f"{name!r} is not a UNet transformer name")


def grid_side(latent_side: int, level: int) -> int:
    """Side of the feature map `level` stride-2 (pad 1) convolutions below a latent of side `latent_side`."""
    for _ in range(level):
        latent_side = -(-latent_side // 2)
    return latent_side


def frozen_unet_modules(config: UNetConfig, taps: tuple[str, ...]) -> tuple[str, ...]:
    """Top-level parameter names of the SD UNet a pass that stops after `taps` uses (`output_sample=False`):
    everything up to the block holding the last tap. The rest of a pretrained UNet is not loaded."""
    n = len(config.down_block_types)
    order = (["time_embedding", "conv_in"] + [f"down_blocks_{i}" for i in range(n)] + ["mid_block"]
             + [f"up_blocks_{i}" for i in range(n)] + list(OUTPUT_HEAD_PARAMS))

    def block(name: str) -> str:
        parts = name.split(".")
        return parts[0] if parts[0] == "mid_block" else f"{parts[0]}_{parts[1]}"

    last = max(order.index(block(t)) for t in taps)
    return tuple(order[: last + 1])


# --------------------------------------------------------------------------------------------------- modules


HEAD_INITS = ("pytorch", "upsample")


# The 'upsample' head runs its SiLUs at an offset where they are nearly the identity (silu(4) = 3.93, slope
# 1.05), so that neither small signals shrink (slope 1/2 at 0) nor negative ones die on the way to the logits.
_SILU_OFFSET = 4.0


def _identity_conv_init(gain: float):
    """A 3x3 kernel that copies its single channel times `gain` (centre tap)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        kernel = jnp.zeros(shape, dtype)
        return kernel.at[shape[0] // 2, shape[1] // 2].set(gain * jnp.eye(shape[2], shape[3], dtype=dtype))

    return init


class UpsampleHead(nn.Module):
    """The reference's `final` (docs/reference.md, "ZNet"): [Conv3x3, SiLU, ConvT k2 s2, SiLU] x 3, Conv3x3; one
    channel throughout. Parameter names are the Sequential indices: final_0, final_2, ..., final_12.

    weight_init 'pytorch' (the reference, docs/reference.md "ZNet initialisation"): PyTorch's default. 'upsample'
    (our option for runs from scratch): the convolutions copy and the transposed convolutions repeat their input;
    the first conv doubles it (undoing the SiLU ahead of the head) and adds 4, the last subtracts 4, so the SiLUs
    between work where they are nearly the identity and the head starts as a nearest 8x upsampling of ZNet's output
    (about unit gain). With PyTorch's init and a UNet that is not SD's, thirteen random 1-channel layers leave
    logits that hardly depend on the image (the reference starts ZNet's conv_out from SD's channel-0 filter)."""

    weight_init: str = "pytorch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.weight_init not in HEAD_INITS:
            raise ValueError(f"UpsampleHead weight_init {self.weight_init!r}; use one of {HEAD_INITS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        first, conv, up, last = {}, {}, {}, {}
        if self.weight_init == "upsample":
            zeros, constant = nn.initializers.zeros, nn.initializers.constant
            # gain 2 undoes the model's SiLU ahead of the head (slope 1/2 at 0); the last conv removes the offset.
            first = dict(kernel_init=_identity_conv_init(2.0), bias_init=constant(_SILU_OFFSET))
            conv = dict(kernel_init=_identity_conv_init(1.0), bias_init=zeros)
            up = dict(kernel_init=nn.initializers.ones, bias_init=zeros)  # k x k stride k: nearest
            last = dict(kernel_init=_identity_conv_init(1.0), bias_init=constant(-_SILU_OFFSET))
        for i in range(3):
            x = nn.silu(Conv(1, 3, padding=1, name=f"final_{4 * i}", **(first if i == 0 else conv), **kw)(x))
            x = nn.silu(ConvTranspose(1, 2, 2, name=f"final_{4 * i + 2}", **up, **kw)(x))
        return Conv(1, 3, padding=1, name="final_12", **last, **kw)(x)


class LDZNet(nn.Module):
    """LD-ZNet, or ZNet with `inject=False`. Call: (images (B, H, W, 3) in [-1, 1], H and W multiples of 8,
    token_ids (B, L) int, keys (B,) PRNG keys) -> logits (B, H, W, 1).

    unet              the SD UNet architecture (ZNet uses it with out_channels 1)
    sites             transformers to inject into; () = `injection_sites(unet)` (docs/reference.md, "Injection sites")
    pool_image_size   image side the attention pools' learned grids are sized for: 384 gives 12 x 12 and 6 x 6
                      (145 / 37 tokens, docs/reference.md "Attention pools"); other inputs resize the grid bicubically
    latent_scale      0.18215 (the reference's, docs/reference.md "LD-ZNet at a glance")
    sample_latent     VAE posterior sample (the reference, in training and at inference) or its mean
    sd_timesteps      'uniform': (low, high), t ~ U{low, ..., high - 1} per example (reference: (300, 500));
    sd_timestep_mode  'mean': the listed t's, SD features averaged over them (one shared noise draw per example);
                      one t is a fixed timestep. (Our option: the reference draws one t, docs/reference.md
                      "Frozen SD branch".)
    head_init         'pytorch' (reference) or 'upsample' (for runs from scratch; UpsampleHead says why)
    """

    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = SD_VAE
    text: CLIPTextConfig = CLIP_VIT_L14_TEXT
    inject: bool = True
    sites: tuple[str, ...] = ()
    pool_image_size: int = 384
    latent_scale: float = LATENT_SCALE
    sample_latent: bool = True
    sd_timesteps: tuple[int, ...] = (300, 500)
    sd_timestep_mode: str = "uniform"
    schedule: NoiseSchedule = NoiseSchedule()
    head_init: str = "pytorch"
    compute: Compute = Compute()

    @property
    def injection_sites(self) -> tuple[str, ...]:
        return tuple(self.sites) or injection_sites(self.unet)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def attn_pools(self) -> tuple[tuple[str, int], ...]:
        """(site, learned grid side) for every injection site."""
        latent = self.pool_image_size // self.vae_factor
        return tuple((name, grid_side(latent, site_level(self.unet, name))) for name in self.injection_sites)

    def _check(self, images: jax.Array, token_ids: jax.Array, keys: jax.Array):
        if self.vae_factor != 8:
            raise ValueError(f"the LD-ZNet head upsamples 8x but this VAE downsamples {self.vae_factor}x")
        if self.text.hidden_size != self.unet.cross_attention_dim:
            raise ValueError(f"the text encoder's width {self.text.hidden_size} differs from the UNet's "
                             f"cross_attention_dim {self.unet.cross_attention_dim}")
        batch, height, width = images.shape[:3]
        if height % 8 or width % 8:
            raise ValueError(f"LD-ZNet needs image sides divisible by 8, got {height}x{width}")
        if token_ids.shape[0] != batch or keys.shape != (batch,):
            raise ValueError(f"batch mismatch: images {images.shape}, token_ids {token_ids.shape}, keys {keys.shape} "
                             "(one PRNG key per example)")
        if self.sd_timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"sd_timestep_mode={self.sd_timestep_mode!r}; modes: {TIMESTEP_MODES}")
        ts = tuple(self.sd_timesteps)
        t_max = self.schedule.num_train_timesteps
        if self.sd_timestep_mode == "uniform" and not (len(ts) == 2 and 0 <= ts[0] < ts[1] <= t_max):
            raise ValueError(f"sd_timesteps={ts} with mode 'uniform' must be (low, high), 0 <= low < high <= {t_max}")
        if self.sd_timestep_mode == "mean" and not (ts and all(0 <= t < t_max for t in ts)):
            raise ValueError(f"sd_timesteps={ts} with mode 'mean' must be timesteps in [0, {t_max})")

    def _kw(self) -> dict:
        return self.compute.layer_kwargs

    def _sd_features(self, z: jax.Array, context: jax.Array, t_keys: jax.Array,
                     noise_keys: jax.Array) -> dict[str, jax.Array]:
        """The frozen SD UNet's transformer outputs at the injection sites on noisy latents (docs/reference.md,
        "Frozen SD branch", "Injection sites")."""
        batch = z.shape[0]
        noise = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(noise_keys)
        if self.sd_timestep_mode == "uniform":
            low, high = self.sd_timesteps
            ts = draw_timesteps(t_keys, low, high)[None]  # (1, B)
        else:
            ts = jnp.broadcast_to(jnp.asarray(self.sd_timesteps, jnp.int32)[:, None], (len(self.sd_timesteps), batch))
        count = ts.shape[0]
        z_t = q_sample(self.schedule, jnp.tile(z, (count, 1, 1, 1)), ts.reshape(-1), jnp.tile(noise, (count, 1, 1, 1)))
        sd_unet = UNet2DConditionModel(self.unet, compute=self.compute, name="sd_unet")
        out = sd_unet(z_t, ts.reshape(-1), jnp.tile(context, (count, 1, 1)), taps=self.injection_sites,
                      output_sample=False)
        # The reference's extractor runs under no_grad; several timesteps ('mean' mode) are averaged per site.
        return {name: jax.lax.stop_gradient(f.reshape(count, batch, *f.shape[1:]).mean(axis=0))
                for name, f in out.taps.items()}

    @nn.compact
    def __call__(self, images: jax.Array, token_ids: jax.Array, keys: jax.Array) -> jax.Array:
        self._check(images, token_ids, keys)
        batch = images.shape[0]
        split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
        vae_keys, t_keys, noise_keys = split[:, 0], split[:, 1], split[:, 2]

        posterior = AutoencoderKLEncoder(self.vae, name="vae", **self._kw())(images)
        if self.sample_latent:
            noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(vae_keys)
            latent = posterior.mean + posterior.std * noise.astype(posterior.mean.dtype)
        else:
            latent = posterior.mean
        z = jax.lax.stop_gradient(latent.astype(jnp.float32)) * self.latent_scale  # frozen VAE, no gradient
        context = jax.lax.stop_gradient(  # frozen CLIP, last_hidden_state (post final LN), not pooled
            CLIPTextModel(self.text, name="text_encoder", **self._kw())(token_ids).last_hidden_state)

        pooled_inputs = self._sd_features(z, context, t_keys, noise_keys) if self.inject else None
        znet = UNet2DConditionModel(dataclasses.replace(self.unet, out_channels=1), compute=self.compute,
                                    attn_pools=self.attn_pools() if self.inject else (), name="znet")
        # As the reference: ZNet sees the clean latent (no noise) at t = 0.
        out = znet(z, jnp.zeros((batch,), jnp.int32), context, pooled_inputs=pooled_inputs).sample
        self.sow("intermediates", "znet_sample", out)  # with apply(..., mutable=["intermediates"]), for tests
        # As the reference: an extra SiLU after the 1-channel conv_out, then the learned 8x head, whose last conv
        # gives the logits (docs/reference.md, "ZNet").
        logits = UpsampleHead(self.head_init, name="head", **self._kw())(nn.silu(out))
        return logits.astype(jnp.float32)


# ------------------------------------------------------------------------------------------ pretrained weights


def params_from_sd(config: UNetConfig, unet: Mapping[str, Any], vae: Mapping[str, Any],
                   text_encoder: Mapping[str, Any] | None = None, *, inject: bool = True,
                   sites: tuple[str, ...] = ()) -> dict:
    """The parameters of LDZNet that come from Stable Diffusion (docs/reference.md, "ZNet initialisation"), from
    SD UNet / VAE / CLIP trees: `znet` is the whole SD UNet with conv_out sliced to its first output channel (weight
    [..., 0:1], bias [0:1]; not zero, not random); `sd_unet` (with `inject`) the part of the same UNet the frozen
    pass uses; `vae` and `text_encoder` as given. Everything `is_new_parameter` names keeps its initialisation.
    Works on numpy or jax arrays."""
    conv_out = unet.get("conv_out")
    if conv_out is None or set(conv_out) != {"kernel", "bias"}:
        raise ValueError(f"the SD UNet parameters have no conv_out kernel/bias (top-level keys: {sorted(unet)})")
    znet = dict(unet)
    znet["conv_out"] = {"kernel": conv_out["kernel"][..., 0:1], "bias": conv_out["bias"][0:1]}
    params = {"vae": dict(vae), "znet": znet}
    if text_encoder is not None:
        params["text_encoder"] = dict(text_encoder)
    if inject:
        keep = frozen_unet_modules(config, tuple(sites) or injection_sites(config))
        missing = [k for k in keep if k not in unet]
        if missing:
            raise ValueError(f"the SD UNet parameters lack {missing} (top-level keys: {sorted(unet)})")
        params["sd_unet"] = {k: unet[k] for k in keep}
    return params


def is_new_parameter(path: tuple[str, ...]) -> bool:
    """True for the parameters SD weights do not provide: the head and the injection modules (PyTorch default
    init, docs/reference.md "ZNet initialisation")."""
    return path[0] == "head" or any(part in NEW_MODULES for part in path)


def count_params(tree: Any) -> int:
    """Number of values in a parameter tree of arrays, ShapeDtypeStructs or boxed leaves."""
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))
