"""VPD: Stable Diffusion's UNet as a one-step feature extractor, and the three task models (the original:
docs/reference.md, "VPD" and the sections under it).

image in [-1, 1] -> VAE posterior mean (stop_gradient; no 0.18215 scale by default; docs/reference.md, "VPD
backbone") -> UNet at t = 1 with the task's text context -> four decoder states, finest first, with head-averaged
cross-attention maps concatenated after the features of the same resolution (docs/reference.md, "VPD taps", "VPD
attention maps") -> task head.

Parameter tree (what the optimizer rules in `vpd_jax.run.optim` match on): `vae` (frozen), `unet`, `text_adapter`,
`head`, and for referring segmentation `text_encoder` (frozen CLIP); BatchNorm statistics in `batch_stats`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.models import resize
from vpd_jax.models.clip_text import CLIP_VIT_L14_TEXT, CLIPTextConfig, CLIPTextModel
from vpd_jax.models.compute import Compute
from vpd_jax.models.heads import DepthHead, SemanticFPN, SimpleDecoding
from vpd_jax.models.text_adapter import TextAdapter, depth_context, referring_context, segmentation_context
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import SD_VAE, AutoencoderKLEncoder, VAEConfig

# The backbone's input sides are multiples of this: the VAE and the UNet halve them 6 times.
IMAGE_SIDE_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """What to read out of the UNet for a given latent size: four tap names (finest first) and the attention
    layers whose maps are averaged per resolution."""

    taps: tuple[str, ...]
    attn_layers: tuple[str, ...]


def vpd_taps(config: UNetConfig) -> tuple[str, ...]:
    """The outputs of ldm output blocks 11, 7, 4, 1 (finest first; docs/reference.md, "VPD taps"): the last up
    block's output and the state after the second layer (resnet, then its transformer if any) of each other up
    block."""
    n = len(config.up_block_types)
    if n != 4:
        raise ValueError(f"VPD reads four decoder levels; this UNet has {n} up blocks")
    second_layer = [f"up_blocks.{i}.{'attentions' if kind == 'CrossAttnUpBlock2D' else 'resnets'}.1"
                    for i, kind in enumerate(config.up_block_types[:-1])]
    return (f"up_blocks.{n - 1}", *reversed(second_layer))


def cross_attention_layers(config: UNetConfig, latent_hw: Sequence[int], max_queries: int) -> tuple[str, ...]:
    """attn2 of the down and up blocks whose query count is <= max_queries (the reference's 'up_cross+down_cross';
    the mid block's maps are excluded; docs/reference.md, "VPD attention maps")."""
    n = len(config.down_block_types)
    h, w = latent_hw
    selected = []
    _, maps = config.module_names()
    for name in maps:
        parts = name.split(".")
        if parts[-1] != "attn2" or parts[0] == "mid_block":
            continue
        level = int(parts[1]) if parts[0] == "down_blocks" else n - 1 - int(parts[1])
        side_h, side_w = -(-h // 2 ** level), -(-w // 2 ** level)
        if side_h * side_w <= max_queries:
            selected.append(name)
    return tuple(selected)


def feature_spec(config: UNetConfig, image_hw: Sequence[int], use_attn: bool,
                 attn_max_queries: int | None = None) -> FeatureSpec:
    """Default map selection: query count <= (H/16)(W/16), i.e. (base_size/16)^2 = 32^2 for 512 inputs."""
    latent_hw = (image_hw[0] // 8, image_hw[1] // 8)
    if not use_attn:
        return FeatureSpec(vpd_taps(config), ())
    max_queries = attn_max_queries if attn_max_queries is not None else (image_hw[0] // 16) * (image_hw[1] // 16)
    return FeatureSpec(vpd_taps(config), cross_attention_layers(config, latent_hw, max_queries))


def assemble_features(taps: dict[str, jax.Array], maps: dict[str, jax.Array], spec: FeatureSpec,
                      stop_grad_attn: bool) -> list[jax.Array]:
    """Features finest first; the maps of each resolution are averaged (unweighted, over layers) and concatenated
    after the feature of that resolution. `stop_grad_attn` reproduces the reference, whose maps carry no gradient
    (ldm's checkpointed transformer blocks run their forward under no_grad; docs/reference.md, "VPD attention
    maps")."""
    features = [taps[name] for name in spec.taps]
    by_size: dict[tuple[int, int], list[jax.Array]] = {}
    for name in spec.attn_layers:
        by_size.setdefault(tuple(maps[name].shape[1:3]), []).append(maps[name])
    for size, group in by_size.items():
        mean = sum(group[1:], group[0]) / len(group)
        if stop_grad_attn:
            mean = jax.lax.stop_gradient(mean)
        matches = [i for i, f in enumerate(features) if tuple(f.shape[1:3]) == size]
        if not matches:
            raise ValueError(f"attention maps of size {size} match no feature level {[f.shape[1:3] for f in features]}")
        i = matches[0]
        features[i] = jnp.concatenate([features[i], mean.astype(features[i].dtype)], axis=-1)
    return features


class _VPDBase(nn.Module):
    """Shared fields and the image -> feature pyramid path of the three task models."""

    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = SD_VAE
    timestep: int = 1  # the reference's t = 1 (not 0, random or 999), no noise (docs/reference.md, "VPD backbone")
    latent_scale: float = 1.0  # VPD never applies SD's 0.18215 (docs/reference.md, "VPD backbone")
    use_attn: bool = True
    attn_max_queries: int | None = None
    stop_grad_attn: bool = True
    # VPD's VAE encoder is frozen and sees no gradient (faithful: False). True lets the loss reach it: only for a
    # scratch VAE that must learn (the demo); its parameters then need a trainable parameter group.
    train_vae: bool = False
    gamma_init: float = 1e-4
    compute: Compute = Compute()

    def _kw(self) -> dict:
        return self.compute.layer_kwargs

    def _adapter(self) -> TextAdapter:
        return TextAdapter(self.gamma_init, name="text_adapter", **self._kw())

    def _features(self, images: jax.Array, context: jax.Array) -> list[jax.Array]:
        """images (B, H, W, 3) in [-1, 1], H and W multiples of 64 -> four features, finest first."""
        height, width = images.shape[1:3]
        if height % IMAGE_SIDE_MULTIPLE or width % IMAGE_SIDE_MULTIPLE:
            raise ValueError(f"VPD needs image sides divisible by {IMAGE_SIDE_MULTIPLE}, got {height}x{width}")
        posterior = AutoencoderKLEncoder(self.vae, name="vae", **self._kw())(images)
        latents = (posterior.mean if self.train_vae else jax.lax.stop_gradient(posterior.mean)) * self.latent_scale
        spec = feature_spec(self.unet, (height, width), self.use_attn, self.attn_max_queries)
        unet = UNet2DConditionModel(self.unet, compute=self.compute, name="unet")
        out = unet(latents, jnp.full((images.shape[0],), self.timestep, jnp.int32), context,
                   taps=spec.taps, attn_maps=spec.attn_layers, output_sample=False)
        features = assemble_features(out.taps, out.attn, spec, self.stop_grad_attn)
        # Available with `apply(..., mutable=["intermediates"])`, for probes and tests.
        self.sow("intermediates", "features", tuple(features))
        return features


class VPDSeg(_VPDBase):
    """Semantic segmentation (docs/reference.md, "Segmentation model and loss"): every image attends to all adapted
    class tokens; Semantic FPN head. Returns logits (B, H, W, num_classes) at the input resolution (bilinear,
    align_corners=False)."""

    num_classes: int = 150
    fpn_channels: int = 256
    dropout_ratio: float = 0.1
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images: jax.Array, class_embeddings: jax.Array, *, train: bool) -> jax.Array:
        if class_embeddings.shape[0] != self.num_classes:
            raise ValueError(f"{class_embeddings.shape[0]} class embeddings for {self.num_classes} classes")
        context = segmentation_context(self._adapter(), class_embeddings, images.shape[0])
        features = self._features(images, context)
        logits = SemanticFPN(self.num_classes, self.fpn_channels, self.dropout_ratio, self.bn_momentum, name="head",
                             **self._kw())(features, train)
        return resize.bilinear(logits, images.shape[1:3], align_corners=False)


class VPDDepth(_VPDBase):
    """Monocular depth (docs/reference.md, "Depth model"): one adapted scene token per image; no attention maps by
    default.

    Inputs whose sides are multiples of 32 but not of 64 (480) are zero-padded bottom/right to the next multiple of
    64 (in [-1, 1] space, i.e. mid-grey) and the fusion map is cropped back, so the depth comes out at the input
    size. Returns depth (B, H, W) in metres, sigmoid * max_depth."""

    use_attn: bool = False
    max_depth: float = 10.0
    fusion_channels: int = 1536
    num_filters: tuple[int, ...] = (32, 32, 32)
    deconv_kernels: tuple[int, ...] = (2, 2, 2)
    decoder_channels: int = 192
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images: jax.Array, class_ids: jax.Array, class_embeddings: jax.Array, *,
                 train: bool) -> jax.Array:
        height, width = images.shape[1:3]
        if height % 32 or width % 32:
            raise ValueError(f"VPDDepth needs image sides divisible by 32, got {height}x{width}")
        multiple = IMAGE_SIDE_MULTIPLE
        padded = jnp.pad(images, ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)))
        context = depth_context(self._adapter(), class_embeddings, class_ids)
        features = self._features(padded, context)
        depth = DepthHead(self.max_depth, self.fusion_channels, self.num_filters, self.deconv_kernels,
                          self.decoder_channels, self.bn_momentum, name="head", **self._kw())(
                              features, train, fusion_size=(height // 32, width // 32))
        return depth[..., 0]


class VPDRefer(_VPDBase):
    """Referring segmentation (docs/reference.md, "Referring model"): frozen CLIP token features (all L tokens, no
    attention mask) adapted token-wise; SimpleDecoding head. Returns logits (B, H, W, 2) at the input size
    (bilinear, align_corners=True)."""

    text: CLIPTextConfig = CLIP_VIT_L14_TEXT
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images: jax.Array, token_ids: jax.Array, *, train: bool) -> jax.Array:
        tokens = CLIPTextModel(self.text, name="text_encoder", **self._kw())(token_ids).last_hidden_state
        context = referring_context(self._adapter(), jax.lax.stop_gradient(tokens))
        features = self._features(images, context)
        return SimpleDecoding(2, 2, self.bn_momentum, name="head", **self._kw())(
            features, train, output_size=images.shape[1:3])
