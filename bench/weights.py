"""The same random UNet weights in both frameworks, without a download and without a shared file.

Every parameter is generated from its PyTorch state-dict name alone (the seed is a hash of the name), in PyTorch
layout: the PyTorch worker copies it into the diffusers module, the JAX worker converts it with the project's
weight converter. So the two benchmark processes hold identical weights while neither imports the other's
framework (their peak-RSS readings stay separate), and their features can be compared.

Scale: PyTorch's default init for weights (U(+-1/sqrt(fan_in))), small uniform biases, norm scales of one, so
activations stay in range through the 860M-parameter network at random initialisation.
"""
from __future__ import annotations

import math
import zlib

import numpy as np


def _is_norm_scale(torch_key: str) -> bool:
    *modules, leaf = torch_key.split(".")
    return leaf == "weight" and "norm" in modules[-1]


def random_weight(torch_key: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` (PyTorch layout) determined by `torch_key`. A 1x1 conv weight (O, I, 1, 1) and
    the linear weight (O, I) with the same name get the same values."""
    shape = tuple(int(s) for s in shape)
    if _is_norm_scale(torch_key):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng(zlib.crc32(torch_key.encode()))
    bound = 1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 0.02
    values = rng.random(math.prod(shape), dtype=np.float32)
    values *= 2 * bound
    values -= bound
    return values.reshape(shape)
