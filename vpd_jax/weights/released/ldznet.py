"""Key map of LD-ZNet's released model (koutilya-pnvr/LD-ZNet: the Lightning checkpoint of `LatentSeg`) onto our
LDZNet variables (vpd_jax/models/ldznet.py).

The file's modules and ours:
  model.diffusion_model.*          ZNet (ldm names) -> `znet` (diffusers names); inside it
    ...attentionpool2D.*           the attention pools -> `...attentions.j.attn_pool` (Conv1d k=1 -> dense)
    ...transformer_blocks.0.{attn3, norm_sd}   the injected cross-attention, same names
    final.{0,2,...,12}             the learned 8x head -> `head.final_*`
  model_ema.<name without dots>    LitEma's shadow copy of every ZNet parameter, with `decay` and `num_updates`
  sd_features_stage_model.model.model.diffusion_model.*   the frozen SD UNet -> `sd_unet`
  first_stage_model.*              the SD VAE -> `vae`
  cond_stage_model.transformer.*   the frozen CLIP text model -> `text_encoder`
The original predicts with the EMA copy (`ema_scope`); `select_weights(use_ema=False)` takes the live weights.
"""
from __future__ import annotations

from vpd_jax.weights import ldm
from vpd_jax.weights.released.keymap import Drop, ReleasedFormat, Route, StateDict, ldm_unet, ldm_vae
from vpd_jax.weights.released.vpd import BN_COUNTER, SCHEDULE

ZNET = ldm.UNET_PREFIX
EMA = ldm.EMA_PREFIX
SD_UNET = "sd_features_stage_model.model.model.diffusion_model."


def ema_key(key: str) -> str:
    """LitEma's buffer name of the ZNet parameter `model.diffusion_model.<name>` (its name under the
    DiffusionWrapper with the dots removed), as in every CompVis training checkpoint."""
    return ldm.unet_file_key(key[len(ZNET):], "model_ema")


def select_weights(state: StateDict, use_ema: bool) -> tuple[StateDict, dict[str, str], dict[str, str]]:
    """ZNet's EMA weights under the live weights' names (use_ema), or the live weights. Returns (state, key ->
    file key, dropped file key -> why). Every ZNet parameter needs its EMA twin; one without is an error."""
    znet = [k for k in state if k.startswith(ZNET)]
    if not use_ema:
        return ({k: v for k, v in state.items() if not k.startswith(EMA)}, {},
                {k: "EMA copy of ZNet (the live weights were chosen)" for k in state if k.startswith(EMA)})
    absent = sorted(ema_key(k) for k in znet if ema_key(k) not in state)
    if absent:
        raise ValueError(f"the EMA copy lacks {len(absent)} ZNet parameter(s), e.g. {absent[:5]}; import the live "
                         "weights instead (use_ema=False)")
    selected = {k: v for k, v in state.items() if not k.startswith(EMA)}
    selected.update({k: state[ema_key(k)] for k in znet})
    origin = {k: ema_key(k) for k in znet}
    used = set(origin.values())
    dropped = {k: ("live ZNet weights (the EMA copy was chosen)" if k.startswith(ZNET) else
                   "LitEma bookkeeping (decay, num_updates)") for k in state
               if (k.startswith(ZNET) or k.startswith(EMA)) and k not in used}
    return selected, origin, dropped


def znet_names(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """ZNet's ldm names -> ours: the UNet renaming, `attentionpool2D` -> `attn_pool` with its Conv1d (k=1) weights
    as dense ones, and the `final` head moved out of the UNet (our `head`)."""
    head = {k: v for k, v in state.items() if k.startswith("final.")}
    unet, origin = ldm_unet({k: v for k, v in state.items() if k not in head})
    renamed = {}
    for key, value in unet.items():
        ours = key.replace(".attentionpool2D.", ".attn_pool.")
        if ".attn_pool." in ours and key.endswith("_proj.weight") and value.ndim == 3:
            value = value[:, :, 0]
        renamed[ours], origin[ours] = value, origin.pop(key)
    for key, value in head.items():
        renamed[f"head.{key}"], origin[f"head.{key}"] = value, key
    return renamed, origin


def _unet_and_head(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    renamed, origin = znet_names(state)
    moved = {(k if k.startswith("head.") else f"znet.{k}"): v for k, v in renamed.items()}
    return moved, {(k if k.startswith("head.") else f"znet.{k}"): o for k, o in origin.items()}


LDZNET = ReleasedFormat(
    task="ldznet", description="LD-ZNet (PyTorch Lightning checkpoint of LatentSeg)", state_key="state_dict",
    routes=(
        Route(ZNET, "", _unet_and_head),
        Route(SD_UNET, "sd_unet.", ldm_unet),
        Route("first_stage_model.", "vae.", ldm_vae),
        Route("cond_stage_model.transformer.", "text_encoder."),
    ),
    drops=(
        # LatentSeg's own noise schedule, and the one of the LatentDiffusion inside the frozen extractor: our
        # model computes the schedule (vpd_jax/models/diffusion.py), from the same constants.
        Drop(SCHEDULE, "noise schedule buffers (recomputed from the schedule's constants)"),
        Drop(rf"sd_features_stage_model\.model\.{SCHEDULE}", "noise schedule of the frozen extractor"),
        Drop(r"first_stage_model\.(decoder\..+|post_quant_conv\.(weight|bias))", "VAE decoder, never run"),
        # transformers < 4.31 saved CLIP's position ids (an arange) as a buffer.
        Drop(r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids", "CLIP position-id buffer"),
        BN_COUNTER,
    ),
    signature=(ZNET, SD_UNET, "first_stage_model."),
    select=select_weights,
    # The frozen extractor's blocks after the last injection site are not in our tree: the frozen pass stops there
    # (vpd_jax/models/ldznet.py `frozen_unet_modules`).
    partial_subtrees={"sd_unet": "frozen SD UNet after the last injection site (our frozen pass stops there)"},
)
