"""VPD's frozen class-embedding buffers: our `.npy` or VPD's released `.pth` (vpd_jax/apps/class_embeddings.py
computes them from a CLIP folder)."""
from __future__ import annotations

import os

import numpy as np

from vpd_jax.weights import torch_archive
from vpd_jax.weights.io import UnreadableWeightsError


def load_class_embeddings(path: str | os.PathLike) -> np.ndarray:
    """(num_classes, D) float32 from our `.npy` or VPD's released `.pth` (read without torch or pickled code).
    Errors name the file and what is wrong with it."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        array = _load_npy(path)
    elif path.endswith((".pth", ".pt")):
        array = torch_archive.load_tensor(path)
    else:
        raise ValueError(f"{path}: class embeddings must be a .npy or a torch .pth/.pt file")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: class embeddings must be a 2-D float array, got {array.dtype} {array.shape}")
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        rows = sorted({int(r) for r in np.nonzero(~np.isfinite(array))[0]})
        raise UnreadableWeightsError(f"{path}: {bad} NaN or infinite value(s), in class row(s) {rows[:10]}")
    return array.astype(np.float32)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such class-embeddings file") from None
    except (ValueError, OSError, EOFError) as err:  # truncated, not .npy, or an object array (a pickle)
        raise UnreadableWeightsError(f"{path}: not a readable .npy array of numbers, truncated or corrupt "
                                     f"({type(err).__name__}: {err})") from err
