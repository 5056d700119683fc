"""`load_unet`, `load_vae`, `load_text_encoder`: a module and its params from a checkpoint on disk.

`path` may be
  * a model folder: `config.json` + weights (`*.safetensors`, sharded `*.safetensors.index.json`, or a torch
    `*.bin` read with weights_only), as written by diffusers / transformers `save_pretrained`;
  * a diffusers pipeline root: its `unet/`, `vae/` or `text_encoder/` subfolder is used;
  * one weights file. For the UNet and the VAE this may be a CompVis single-file SD checkpoint (`.safetensors`
    or `.ckpt`; the config is inferred from tensor shapes, see `vpd_jax.weights.ldm`); a file in diffusers /
    transformers layout takes its config from `config=` or from a `config.json` next to it.
`config=` (a dict or the path of a config.json) replaces the folder's or the inferred config.

Which UNet weights: a diffusers folder holds one UNet in its standard file, whichever was exported into it (the
hub's SD v1.x folders: the EMA weights; a `non_ema` variant file beside it is not read). A CompVis training
checkpoint holds two (`vpd_jax.weights.ldm`): `load_unet(..., compvis_unet='model')` (default) reads its
`model.diffusion_model.` tensors, the non-EMA weights of `sd-v1-4-full-ema.ckpt` that LD-ZNet's frozen UNet and
ZNet start from (and the EMA weights of an `-emaonly` file, which has only those); `compvis_unet='model_ema'` reads
the EMA copy.

Loading is strict (`vpd_jax.weights.convert`). What is deliberately not loaded is listed per model below.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from vpd_jax.models.compute import Compute
from vpd_jax.models.tokenizer import load_tokenizer  # noqa: F401  (re-exported by vpd_jax.weights)
from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig
from vpd_jax.models.vae import AutoencoderKLEncoder, VAEConfig
from vpd_jax.weights import ldm
from vpd_jax.weights.convert import abstract_params, convert_state_dict
from vpd_jax.weights.io import StateDict, UnreadableWeightsError, find_weights_file, read_state_dict

ConfigArg = Mapping[str, Any] | str | os.PathLike | None


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one model type is found and renamed."""

    subfolder: str  # in a diffusers pipeline root
    # Regexes of keys deliberately not loaded (matched at the start of the diffusers / transformers name).
    ignore: tuple[str, ...] = ()
    # Renames for other diffusers / transformers versions' names of the same model: key -> canonical key.
    normalize_key: Callable[[str], str] | None = None
    # CompVis single files: (predicate on the file's keys, (state, source, copy) -> (renamed, diffusers->file key,
    # inferred config)); `copy` is the UNet's (ldm.UNET_COPIES), unused by the other kinds.
    is_ldm: Callable[[StateDict], bool] | None = None
    from_ldm: Callable[[StateDict, str, str], tuple[StateDict, dict[str, str], Callable[[], dict]]] | None = None


def _from_ldm(prefix: str, split: Callable, rename: Callable, infer: Callable):
    """A `_Kind.from_ldm` for the component stored under `prefix` in a full SD file (or alone, unprefixed)."""

    def convert(state: StateDict, source: str, copy: str):
        del copy  # one copy only
        part = split(state, source)
        renamed, origin = rename(part)
        lead = prefix if any(k.startswith(prefix) for k in state) else ""
        return renamed, {k: lead + v for k, v in origin.items()}, lambda: infer(part)

    return convert


def _unet_from_ldm(state: StateDict, source: str, copy: str):
    """`_Kind.from_ldm` of the UNet: the `copy` of a full SD file (ldm.split_unet), or a stand-alone UNet file."""
    part = ldm.split_unet(state, source, copy)
    renamed, origin = ldm.unet_ldm_to_diffusers(part)
    full = any(k.startswith(ldm.UNET_PREFIX) for k in state)
    return (renamed, {k: ldm.unet_file_key(v, copy) if full else v for k, v in origin.items()},
            lambda: ldm.infer_unet_config(part))


# diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn; hub files saved before then
# (SD v1.x VAEs among them) still do.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_vae_attention(key: str) -> str:
    head, sep, tail = key.partition(".mid_block.attentions.0.")
    module, dot, leaf = tail.partition(".")
    if sep and module in _LEGACY_VAE_ATTENTION:
        return f"{head}{sep}{_LEGACY_VAE_ATTENTION[module]}{dot}{leaf}"
    return key


_CLIP_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _add_text_model_prefix(key: str) -> str:
    """transformers 5 saves a CLIPTextModel without the `text_model.` prefix that 4.x (and every SD checkpoint)
    has; the Flax tree keeps the prefix."""
    return f"text_model.{key}" if key.startswith(_CLIP_TEXT_PARTS) else key


def _normalize(state: StateDict, kind: _Kind) -> tuple[StateDict, dict[str, str] | None]:
    """(state with canonical keys, canonical key -> file key)."""
    if kind.normalize_key is None:
        return state, None
    renamed = {kind.normalize_key(k): k for k in state}
    if len(renamed) < len(state):
        both = sorted(k for k in state if kind.normalize_key(k) != k and kind.normalize_key(k) in state)
        raise ValueError(f"the state dict holds both old and new names of the same weights: {both}")
    return {new: state[old] for new, old in renamed.items()}, renamed


_UNET = _Kind("unet", is_ldm=ldm.is_ldm_unet, from_ldm=_unet_from_ldm)
_VAE = _Kind(
    "vae",
    # Only the encoder is built (VPD deletes the decoder, LD-ZNet never runs it; docs/reference.md, "VPD backbone").
    ignore=(r"decoder\.", r"post_quant_conv\."),
    normalize_key=_rename_legacy_vae_attention,
    is_ldm=ldm.is_ldm_vae,
    from_ldm=_from_ldm(ldm.VAE_PREFIX, ldm.split_vae, ldm.vae_ldm_to_diffusers, ldm.infer_vae_config),
)
_TEXT = _Kind(
    "text_encoder",
    ignore=(
        r"text_model\.embeddings\.position_ids$",  # a buffer (arange), saved by transformers < 4.31
        # The other half of a full CLIPModel folder (e.g. openai/clip-vit-large-patch14), and projections.
        r"vision_model\.", r"visual_projection\.", r"text_projection\.", r"logit_scale$",
    ),
    normalize_key=_add_text_model_prefix,
)


def _read_config(config: ConfigArg) -> dict | None:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    with open(config) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise UnreadableWeightsError(f"{config}: not a readable JSON model config ({err})") from None


def _resolve(path: str | os.PathLike, kind: _Kind) -> str:
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    for folder in (path, os.path.join(path, kind.subfolder)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(
        f"{path}: neither a model folder (config.json + weights) nor a pipeline root with {kind.subfolder}/config.json")


def _load_state_and_config(path, kind: _Kind, config: ConfigArg, compvis_unet: str = "model"
                           ) -> tuple[StateDict, dict, dict | None, str]:
    """(state dict in diffusers / transformers naming, config dict, renamed key -> file key, source)."""
    target = _resolve(path, kind)
    override = _read_config(config)
    if compvis_unet not in ldm.UNET_COPIES:
        raise ValueError(f"compvis_unet must be one of {ldm.UNET_COPIES}, got {compvis_unet!r}")
    if os.path.isdir(target):
        if compvis_unet != "model":
            raise ValueError(f"{target}: a diffusers folder holds one UNet (whichever was exported); "
                             f"compvis_unet={compvis_unet!r} applies to CompVis training checkpoints only")
        weights = find_weights_file(target)
        state, origin = _normalize(read_state_dict(weights), kind)
        return state, override or _read_config(os.path.join(target, "config.json")), origin, weights
    state = read_state_dict(target)
    if kind.is_ldm is not None and kind.is_ldm(state):
        renamed, origin, infer_config = kind.from_ldm(state, target, compvis_unet)
        return renamed, override or infer_config(), origin, target
    if compvis_unet != "model":
        raise ValueError(f"{target}: not a CompVis checkpoint; compvis_unet={compvis_unet!r} applies to CompVis "
                         "training checkpoints only")
    sibling = os.path.join(os.path.dirname(target), "config.json")
    if override is None and not os.path.isfile(sibling):
        raise FileNotFoundError(
            f"{target}: a weights file without CompVis keys needs config= or a config.json next to it")
    state, origin = _normalize(state, kind)
    return state, override or _read_config(sibling), origin, target


def _load(path, kind: _Kind, config: ConfigArg, on_host: bool, build: Callable[[dict], Any],
          compvis_unet: str = "model"):
    state, config_dict, origin, source = _load_state_and_config(path, kind, config, compvis_unet)
    module = build(config_dict)
    params = convert_state_dict(state, abstract_params(module), source=source, ignore=kind.ignore, key_origin=origin)
    return module, params if on_host else jax.tree.map(jnp.asarray, params)


# on_host=True returns numpy arrays (host memory) instead of arrays on the default device: the train library
# places them straight into their shards over the mesh.


def load_unet(path, dtype=jnp.float32, param_dtype=jnp.float32, config: ConfigArg = None, on_host: bool = False,
              compvis_unet: str = "model", **module_kwargs):
    """(UNet2DConditionModel, params) from a diffusers unet folder, a pipeline root or a CompVis SD file. The
    module computes in `dtype` with `param_dtype` parameters (its `compute`; module_kwargs may give the whole
    Compute instead). `compvis_unet`: which UNet of a CompVis training checkpoint ('model' or 'model_ema'; module
    docstring)."""
    module_kwargs.setdefault("compute", Compute(dtype=dtype, param_dtype=param_dtype))
    return _load(path, _UNET, config, on_host, lambda c: UNet2DConditionModel(
        config=UNetConfig.from_dict(c), **module_kwargs), compvis_unet)


def load_vae(path, dtype=jnp.float32, param_dtype=jnp.float32, config: ConfigArg = None, on_host: bool = False,
             **module_kwargs):
    """(AutoencoderKLEncoder, params) from a diffusers vae folder, a pipeline root or a CompVis SD / VAE file."""
    return _load(path, _VAE, config, on_host, lambda c: AutoencoderKLEncoder(
        VAEConfig.from_dict(c), dtype=dtype, param_dtype=param_dtype, **module_kwargs))


def load_text_encoder(path, dtype=jnp.float32, param_dtype=jnp.float32, config: ConfigArg = None,
                      on_host: bool = False, **module_kwargs):
    """(CLIPTextModel, params) from an HF CLIP (text) model folder or a diffusers pipeline root."""
    return _load(path, _TEXT, config, on_host, lambda c: CLIPTextModel(
        CLIPTextConfig.from_dict(c), dtype=dtype, param_dtype=param_dtype, **module_kwargs))
