"""VPD's frozen class-embedding buffers: our `.npy` or VPD's released `.pth` (vpd_jax/apps/class_embeddings.py
computes them from a CLIP folder)."""
from __future__ import annotations

import os

import numpy as np

from vpd_jax.weights import torch_archive


def load_class_embeddings(path: str | os.PathLike) -> np.ndarray:
    """(num_classes, D) float32 from our `.npy` or VPD's released `.pth` (read without torch or pickled code)."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        array = np.load(path, allow_pickle=False)
    elif path.endswith((".pth", ".pt")):
        array = torch_archive.load_tensor(path)
    else:
        raise ValueError(f"{path}: class embeddings must be a .npy or a torch .pth/.pt file")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: class embeddings must be a 2-D float array, got {array.dtype} {array.shape}")
    return array.astype(np.float32)
