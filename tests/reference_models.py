"""Tiny PyTorch reference models (diffusers / transformers), saved in the real on-disk formats.

Shared by the model parity tests and the weight-loading tests. Every builder perturbs the norm scales and biases
(PyTorch initialises them to 1 and 0) so that a converter that drops or swaps them cannot pass a parity test.

Also here: an independent diffusers -> CompVis (ldm) key mapping for building single-file checkpoints. It is
written in the opposite direction from `vpd_jax.weights.ldm` on purpose, and the tests validate it against
diffusers' own ldm -> diffusers converter.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------- helpers


def perturb_norms_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def save_safetensors(path: str, state: Mapping[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path


def max_rel_diff(ours, reference) -> float:
    """max |ours - reference| / max |reference|: the parity measure of the suite (must be <= 1e-4)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# ----------------------------------------------------------------------------------------------- VAE


def tiny_vae_config(**overrides: Any) -> dict:
    config = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    config.update(overrides)
    levels = len(config["block_out_channels"])
    config.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
    config.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
    return config


def build_tiny_vae(seed: int = 0, **config: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_norms_(AutoencoderKL(**tiny_vae_config(**config)), seed)


def save_tiny_vae(folder: str, seed: int = 0, **config: Any):
    model = build_tiny_vae(seed, **config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


# ----------------------------------------------------------------------------------------------- CLIP text


def tiny_clip_config(**overrides: Any) -> dict:
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63,
                  pad_token_id=63)
    config.update(overrides)
    return config


def build_tiny_clip(seed: int = 0, **config: Any):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return perturb_norms_(CLIPTextModel(CLIPTextConfig(**tiny_clip_config(**config))), seed)


def save_tiny_clip(folder: str, seed: int = 0, **config: Any):
    model = build_tiny_clip(seed, **config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet of GPT-2 / CLIP: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


TOKENIZER_WORDS = ("a", "photo", "of", "the", "cat", "dog", "wall", "sky")


def write_tiny_tokenizer(folder: str, pad_token: str = "<|endoftext|>", words=TOKENIZER_WORDS) -> dict[str, int]:
    """A CLIP BPE tokenizer folder laid out like SD's `tokenizer/` (vocab.json, merges.txt, configs).

    Vocabulary order as in OpenAI CLIP: 256 byte symbols, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` and `<|endoftext|>`. Merges build each word in `words` left to right.
    SD v1 pads with `<|endoftext|>`, SD v2 with `!`. Returns the vocabulary.
    """
    os.makedirs(folder, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   "add_prefix_space": False, "errors": "replace"}, f)
    return vocab


# ----------------------------------------------------------------------------------------------- UNet


def build_tiny_unet(config: Mapping[str, Any], seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb_norms_(UNet2DConditionModel(**config), seed)


def save_tiny_unet(folder: str, config: Mapping[str, Any], seed: int = 0):
    """Build a `UNet2DConditionModel(**config)` with perturbed norms and `save_pretrained` it (safetensors)."""
    model = build_tiny_unet(config, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def save_pipeline(root: str, *, unet=None, vae=None, text_encoder=None, tokenizer_pad_token=None) -> str:
    """A diffusers pipeline root: model_index.json plus the given components in their subfolders."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, model, library in (("unet", unet, "diffusers"), ("vae", vae, "diffusers"),
                                 ("text_encoder", text_encoder, "transformers")):
        if model is not None:
            model.save_pretrained(os.path.join(root, name), safe_serialization=True)
            index[name] = [library, type(model).__name__]
    if tokenizer_pad_token is not None:
        write_tiny_tokenizer(os.path.join(root, "tokenizer"), pad_token=tokenizer_pad_token)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return root


# ----------------------------------------------------------------------------------------------- diffusers -> ldm

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_diffusers_to_ldm(state: Mapping[str, np.ndarray], layers_per_block: int,
                          prefix: str = "model.diffusion_model.") -> dict[str, np.ndarray]:
    """The CompVis `openaimodel.UNetModel` names of a diffusers UNet state dict."""
    per_level = layers_per_block + 1
    up_levels_with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                rest = [_RESNET_TO_LDM[rest[0]], *rest[1:]]
            if parts[0] == "down_blocks":
                block = {"resnets": f"input_blocks.{1 + level * per_level + index}.0",
                         "attentions": f"input_blocks.{1 + level * per_level + index}.1",
                         "downsamplers": f"input_blocks.{(level + 1) * per_level}.0.op"}[kind]
                rest = rest[1:] if kind == "downsamplers" else rest  # drop `conv`
            else:
                upsample_slot = 2 if level in up_levels_with_attention else 1
                block = {"resnets": f"output_blocks.{level * per_level + index}.0",
                         "attentions": f"output_blocks.{level * per_level + index}.1",
                         "upsamplers": f"output_blocks.{level * per_level + layers_per_block}.{upsample_slot}"}[kind]
            new = ".".join([block, *rest])
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                new = ".".join([f"middle_block.{2 * index}", _RESNET_TO_LDM[rest[0]], *rest[1:]])
            else:
                new = ".".join(["middle_block.1", *rest])
        elif parts[0] == "time_embedding":
            new = ".".join([{"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]], *parts[2:]])
        else:
            top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
            new = ".".join([top[parts[0]], *parts[1:]])
        out[prefix + new] = value
    return out


_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_diffusers_to_ldm(state: Mapping[str, np.ndarray], prefix: str = "first_stage_model.") -> dict[str, np.ndarray]:
    """The CompVis `AutoencoderKL` names of a diffusers AutoencoderKL state dict (encoder and decoder)."""
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] not in ("encoder", "decoder"):
            out[prefix + key] = value
            continue
        side, module, rest = parts[0], parts[1], parts[2:]
        if module in ("down_blocks", "up_blocks"):
            level = int(rest[0]) if module == "down_blocks" else levels - 1 - int(rest[0])
            group = "down" if module == "down_blocks" else "up"
            if rest[1] == "resnets":
                tail = ["nin_shortcut" if rest[3] == "conv_shortcut" else rest[3], *rest[4:]]
                path = [group, str(level), "block", rest[2], *tail]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                path = [group, str(level), "downsample" if group == "down" else "upsample", *rest[3:]]
        elif module == "mid_block" and rest[0] == "resnets":
            tail = ["nin_shortcut" if rest[2] == "conv_shortcut" else rest[2], *rest[3:]]
            path = ["mid", f"block_{int(rest[1]) + 1}", *tail]
        elif module == "mid_block":  # attentions.0.<name>[.0].<leaf>: 1x1 convs in ldm
            name = _VAE_ATTENTION_TO_LDM[rest[2]]
            path = ["mid", "attn_1", name, rest[-1]]
            if name != "norm" and rest[-1] == "weight":
                value = value[:, :, None, None]
        elif module == "conv_norm_out":
            path = ["norm_out", *rest]
        else:
            path = [module, *rest]
        out[prefix + ".".join([side, *path])] = value
    return out


def corrupt_state_dict(state: Mapping[str, np.ndarray], misshape: str, drop: str,
                       extra: str = "not_a_layer.weight") -> dict[str, np.ndarray]:
    """One tensor with a wrong shape (last dim + 1), one missing, one extra."""
    state = dict(state)
    shape = state[misshape].shape
    state[misshape] = np.zeros((*shape[:-1], shape[-1] + 1), np.float32)
    del state[drop]
    state[extra] = np.zeros((3,), np.float32)
    return state


def assert_same_params(a, b):
    """Two param trees have the same structure and bit-identical leaves."""
    import jax

    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    paths_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in paths_a] == list(paths_b)
    for path, leaf in paths_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(paths_b[path]), err_msg=jax.tree_util.keystr(path))
