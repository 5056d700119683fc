"""Reading the authors' released checkpoint files without running pickled code, and finding their state dict.

The files are `torch.save` zip archives. They are read with the project's restricted unpickler
(`vpd_jax.weights.torch_archive`: tensors, plain containers and the `argparse.Namespace` of the referring models'
training arguments, no torch needed); anything else that would need code to unpickle is refused.

Containers (the originals' save calls):
  mmseg (VPD segmentation)   {'meta': {...}, 'state_dict': {...}[, 'optimizer': ...]}
  VPD depth                  {'model': {...}[, 'optimizer': ...]}   keys may carry DDP's 'module.' prefix
  VPD referring              {'model': {...}, 'optimizer', 'epoch', 'lr_scheduler', 'args': argparse.Namespace}
  PyTorch Lightning (LD-ZNet) {'state_dict': {...}, 'epoch', 'global_step', 'pytorch-lightning_version', ...}
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from vpd_jax.weights import torch_archive

StateDict = dict[str, np.ndarray]


class ReleasedCheckpointError(ValueError):
    """A released checkpoint file cannot be read, or is not the expected task's."""


def read_archive(path: str | os.PathLike) -> Any:
    """The object saved at `path`, tensors as numpy arrays. Errors name the file and what is wrong with it."""
    try:
        return torch_archive.load(os.fspath(path))
    except (ValueError, OSError) as err:  # refused, missing, truncated, corrupt: the reader's message names the file
        raise ReleasedCheckpointError(f"cannot read the released checkpoint: {err}") from None


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
