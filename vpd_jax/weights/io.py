"""Reading state dicts from disk as numpy arrays: safetensors (single or sharded) and, with torch, `.ckpt`.

safetensors are read with `safetensors.numpy` (no torch). Pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`)
are read only through `torch.load(weights_only=True)`, which refuses arbitrary objects; they are never
unpickled any other way.

A file that cannot be read raises `UnreadableWeightsError` (truncated, corrupt, not the format its name says) or
`UnsafePickleError` (a pickle that holds more than tensors and containers), both naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Iterable

import numpy as np

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Default file names written by diffusers and transformers `save_pretrained`, preferred over variants (fp16, ...).
STANDARD_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")

StateDict = dict[str, np.ndarray]


class UnreadableWeightsError(ValueError):
    """A weights or class-embedding file that cannot be read: the message names the file and what is wrong."""


class UnsafePickleError(UnreadableWeightsError, pickle.UnpicklingError):
    """A pickle that asks for something other than plain tensors and containers (refused before it runs)."""


def _describe(path: str) -> str:
    """'<path> (<n> bytes)', or '<path> (missing)'."""
    try:
        return f"{path} ({os.path.getsize(path):,} bytes)"
    except OSError:
        return f"{path} (missing)"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read one weights file: `*.safetensors`, a sharded `*.safetensors.index.json`, or a torch pickle."""
    path = os.fspath(path)
    if path.endswith(SAFETENSORS_INDEX_SUFFIX):
        return _read_sharded_safetensors(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return _read_torch_pickle(path)
    raise ValueError(f"{path}: unknown weights format; expected .safetensors, {SAFETENSORS_INDEX_SUFFIX} "
                     f"or one of {PICKLE_SUFFIXES}")


def _read_safetensors(path: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(path)
        except TypeError as err:
            # numpy has no bfloat16; safetensors' flax reader returns ml_dtypes bfloat16 arrays instead.
            if "bfloat16" not in str(err):
                raise
            from safetensors.flax import load_file as load_file_flax

            return {k: np.asarray(v) for k, v in load_file_flax(path).items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    except TypeError as err:
        raise UnreadableWeightsError(f"{path}: holds tensors of a dtype this reader cannot convert ({err})") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise UnreadableWeightsError(f"{_describe(path)}: not a readable safetensors file, truncated or corrupt "
                                     f"(safetensors: {err})") from err


def _read_sharded_safetensors(index_path: str) -> StateDict:
    try:
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UnreadableWeightsError(f"{_describe(index_path)}: not a safetensors index (JSON with a "
                                     f"'weight_map'): {_first_line(err)}") from err
    folder = os.path.dirname(index_path)
    state: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise FileNotFoundError(f"{index_path}: shard {shard!r} listed in the index is not in {folder}")
        state.update(_read_safetensors(os.path.join(folder, shard)))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise ValueError(f"{index_path}: {len(absent)} key(s) listed in the index are not in their shards: {absent}")
    return state


def _read_torch_pickle(path: str) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle, which is read only through torch.load(weights_only=True), and torch is not "
            f"installed. Install torch, or convert the file to safetensors on a machine that has it:\n"
            f"  python -c \"import torch, safetensors.torch as st; sd = torch.load('{path}', map_location='cpu', "
            f"weights_only=True); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
            f"'{os.path.splitext(path)[0]}.safetensors')\"") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    except pickle.UnpicklingError as err:
        # torch's message ("Weights only load failed ...") explains at length and names no file.
        raise UnsafePickleError(f"{path}: refused by torch.load(weights_only=True): the pickle holds objects other "
                                f"than tensors and containers, and it is never unpickled any other way "
                                f"({_first_line(err)})") from err
    except Exception as err:  # torch raises RuntimeError / EOFError / zip errors for truncated or foreign files
        raise UnreadableWeightsError(f"{_describe(path)}: not a readable PyTorch checkpoint, truncated or corrupt "
                                     f"({_first_line(err)})") from err
    # Lightning / CompVis checkpoints wrap the weights: {'state_dict': {...}, 'global_step': ..., ...}.
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(checkpoint)}")
    return {k: _tensor_to_numpy(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _tensor_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # exact; numpy has no bfloat16 and the loader casts to param_dtype anyway
    return tensor.numpy()


def find_weights_file(folder: str) -> str:
    """The weights file of a diffusers / transformers model folder.

    Order: a sharded safetensors index, a single safetensors file, then a torch pickle (`*.bin`). Among several
    candidates of one kind the standard `save_pretrained` name wins (e.g. over an fp16 variant).
    """
    names = sorted(os.listdir(folder))
    for suffixes in ((SAFETENSORS_INDEX_SUFFIX,), (".safetensors",), PICKLE_SUFFIXES):
        candidates = [n for n in names if n.endswith(suffixes)]
        if not candidates:
            continue
        if len(candidates) == 1:
            return os.path.join(folder, candidates[0])
        standard = [n for n in candidates if _stem(n, suffixes) in STANDARD_WEIGHT_NAMES]
        if len(standard) == 1:
            return os.path.join(folder, standard[0])
        raise ValueError(
            f"{folder}: several weights files {candidates}; pass the path of the one to load instead of the folder")
    raise FileNotFoundError(f"{folder}: no weights file (*.safetensors, *{SAFETENSORS_INDEX_SUFFIX} or *.bin)")


def _stem(name: str, suffixes: Iterable[str]) -> str:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
