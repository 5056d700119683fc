"""Reading the authors' released checkpoint files without running pickled code, and finding their state dict.

The files are `torch.save` zip archives. They are read with the project's restricted unpickler
(`vpd_jax.weights.torch_archive`: tensors and plain containers only). Some containers also pickle harmless
objects that reader refuses, such as the `argparse.Namespace` of the referring-segmentation training arguments;
those files are read through `torch.load(weights_only=True)` with exactly the globals of `HARMLESS_GLOBALS`
allowed, when torch is installed. Anything else that would need code to unpickle is refused.

Containers (the originals' save calls):
  mmseg (VPD segmentation)   {'meta': {...}, 'state_dict': {...}[, 'optimizer': ...]}
  VPD depth                  {'model': {...}[, 'optimizer': ...]}   keys may carry DDP's 'module.' prefix
  VPD referring              {'model': {...}, 'optimizer', 'epoch', 'lr_scheduler', 'args': argparse.Namespace}
  PyTorch Lightning (LD-ZNet) {'state_dict': {...}, 'epoch', 'global_step', 'pytorch-lightning_version', ...}
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from vpd_jax.weights import torch_archive

# Globals a released container pickles besides tensors, that only hold plain values: (module, name).
HARMLESS_GLOBALS = (("argparse", "Namespace"),)

StateDict = dict[str, np.ndarray]


class ReleasedCheckpointError(ValueError):
    """A released checkpoint file cannot be read, or is not the expected task's."""


def read_archive(path: str | os.PathLike) -> Any:
    """The object saved at `path`, tensors as numpy arrays. Errors name the file and what is wrong with it."""
    path = os.fspath(path)
    try:
        return torch_archive.load(path)
    except torch_archive.UnsafePickleError as err:  # a global the torch-free reader refuses
        refused = err
    except (ValueError, OSError) as err:  # missing, truncated, corrupt: the reader's message names the file
        raise ReleasedCheckpointError(f"cannot read the released checkpoint: {err}") from None
    return _read_with_torch(path, refused)


def _read_with_torch(path: str, refused: Exception) -> Any:
    """torch.load(weights_only=True) allowing only HARMLESS_GLOBALS; tensors become numpy arrays."""
    try:
        import torch
    except ImportError:
        raise ReleasedCheckpointError(
            f"{refused}\n{path} pickles objects besides tensors; the torch-free reader refuses them. Objects of "
            f"{['.'.join(g) for g in HARMLESS_GLOBALS]} are harmless and can be read through "
            "torch.load(weights_only=True): install torch to import this file.") from None
    import importlib

    allowed = [getattr(importlib.import_module(module), name) for module, name in HARMLESS_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ReleasedCheckpointError(
            f"{path}: refusing to unpickle it: it needs code beyond tensors and plain containers "
            f"({str(err).splitlines()[0]})") from None
    except Exception as err:  # a damaged archive that the torch-free reader reported as unreadable
        raise ReleasedCheckpointError(f"{refused}\ntorch.load(weights_only=True) fails too: "
                                      f"{type(err).__name__}: {err}") from None
    return _to_numpy(obj, torch)


def _to_numpy(obj: Any, torch) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _to_numpy(v, torch)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, torch) for v in obj)
    return obj


def state_dict_of(container: Any, key: str, path: str, *, strip_ddp_prefix: bool = False) -> StateDict:
    """container[key] as {name: array}, with DDP's 'module.' prefix removed when every key has it and
    `strip_ddp_prefix` (the original depth test strips it). Non-tensor entries are an error."""
    if not isinstance(container, dict) or key not in container:
        found = sorted(container) if isinstance(container, dict) else type(container).__name__
        raise ReleasedCheckpointError(f"{path}: expected a dict with {key!r} (the released container), found {found}")
    state = container[key]
    if not isinstance(state, dict) or not state:
        raise ReleasedCheckpointError(f"{path}: {key!r} is not a non-empty state dict")
    not_arrays = sorted(k for k, v in state.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise ReleasedCheckpointError(f"{path}: {key!r} holds non-tensor entries {not_arrays[:5]}")
    if strip_ddp_prefix and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)
