"""Key maps of VPD's released task models (wl-zhao/VPD): segmentation (mmseg `VPDSeg`), depth (`VPDDepth`) and
referring segmentation (`VPDRefer`), onto our VPDSeg / VPDDepth / VPDRefer variables.

Our trees (vpd_jax/models/vpd.py): `vae` (the SD VAE encoder, diffusers names), `unet` (the SD UNet, diffusers
names, without the noise head VPD never runs), `text_adapter` (`fc_0`, `fc_2`, and `gamma`, which VPD keeps on the
task model), `head` (the task head, named as the original's modules), BatchNorm statistics in `batch_stats`.
docs/released_checkpoints.md tabulates the rules.
"""
from __future__ import annotations

from vpd_jax.weights.released.keymap import Drop, ReleasedFormat, Route, ldm_unet, ldm_vae

# The 13 noise-schedule buffers of a LatentDiffusion (ldm DDPM.register_schedule; lvlb_weights is non-persistent,
# but mmcv's checkpoint writer saves it anyway).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")
SCHEDULE = "(" + "|".join(SCHEDULE_BUFFERS) + ")"
# BatchNorm's update counter: only used with momentum=None, which no head here has.
BN_COUNTER = Drop(r".+\.num_batches_tracked", "BatchNorm update counter")


def backbone(prefix: str) -> tuple[tuple[Route, ...], tuple[Drop, ...]]:
    """Routes and drops of the parts every VPD model shares; `prefix` is where the original keeps them ('' on
    the task model, 'encoder.' in VPDDepth)."""
    p = prefix.replace(".", r"\.")
    routes = (
        Route(f"{prefix}unet.unet.diffusion_model.", "unet.", ldm_unet),  # UNetWrapper(DiffusionWrapper(UNet))
        Route(f"{prefix}encoder_vq.", "vae.", ldm_vae),  # the SD first stage (AutoencoderKL)
        Route(f"{prefix}text_adapter.", "text_adapter."),
        Route(f"{prefix}gamma", "text_adapter.gamma"),  # the adapter's scale, a parameter of the task model
    )
    drops = (
        # The UNet's noise-prediction head (GroupNorm, SiLU, conv_out): VPD's features stop at the last up block.
        Drop(rf"{p}unet\.unet\.diffusion_model\.out\.[02]\.(weight|bias)", "UNet noise head, never run by VPD"),
        # VPD deletes the VAE decoder; post_quant_conv belongs to it. Listed so a file that kept them still loads.
        Drop(rf"{p}encoder_vq\.(decoder\..+|post_quant_conv\.(weight|bias))", "VAE decoder, never run by VPD"),
        BN_COUNTER,
    )
    return routes, drops


def _seg() -> ReleasedFormat:
    routes, drops = backbone("")
    return ReleasedFormat(
        task="seg", description="VPD semantic segmentation (mmseg checkpoint of VPDSeg)", state_key="state_dict",
        routes=routes + (Route("neck.", "head.neck."), Route("decode_head.", "head.decode_head.")),
        # VPDSeg keeps the LatentDiffusion it took the UNet and VAE from as an attribute (`sd_model`): only its
        # noise-schedule buffers are left in the state dict. VPD never noises (t = 1, no noise).
        drops=drops + (Drop(rf"sd_model\.{SCHEDULE}", "noise schedule of the leftover LatentDiffusion"),),
        constants={"class_embeddings": "class_embeddings"},
        signature=("decode_head.", "neck.", "unet.unet.diffusion_model."))


def _depth() -> ReleasedFormat:
    routes, drops = backbone("encoder.")
    return ReleasedFormat(
        task="depth", description="VPD depth (checkpoint of VPDDepth)", state_key="model", strip_ddp_prefix=True,
        routes=routes + (
            Route("encoder.layer1.", "head.encoder.layer1."),  # VPDDepthEncoder's fusion layers
            Route("encoder.layer2.", "head.encoder.layer2."),
            Route("encoder.out_layer.", "head.encoder.out_layer."),
            Route("decoder.", "head.decoder."),
            Route("last_layer_depth.", "head.last_layer_depth."),
        ),
        drops=drops,
        constants={"class_embeddings": "encoder.class_embeddings"},
        transposed_convs=(r"head\.decoder\.deconv_layers\.\d+\.weight",),
        signature=("encoder.layer1.", "decoder.deconv_layers.", "encoder.unet.unet.diffusion_model."))


def _refer() -> ReleasedFormat:
    routes, drops = backbone("")
    return ReleasedFormat(
        task="refer", description="VPD referring segmentation (checkpoint of VPDRefer)", state_key="model",
        strip_ddp_prefix=True,
        routes=routes + (Route("classifier.", "head."),),  # SimpleDecoding
        drops=drops,
        signature=("classifier.conv1_4.", "unet.unet.diffusion_model."),
        # The original runs its frozen CLIP text encoder outside the model and loads it from its own files.
        not_in_file=("text_encoder",))


SEG, DEPTH, REFER = _seg(), _depth(), _refer()
