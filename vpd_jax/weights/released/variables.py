"""Strict conversion of a renamed released state dict onto a model's whole variables tree (params + batch_stats).

`vpd_jax.weights.convert.convert_state_dict` converts the leaves a diffusers / transformers model has (`kernel`,
`scale`, `embedding`, `bias`). The task models also hold leaves with other names, loaded here by the same naming
rule (`a.0.b.<torch leaf>` -> `a_0/b/<flax leaf>`):
  params/.../gamma                      <- gamma                  the text adapter's per-channel scale, as is
  params/.../positional_embedding       <- positional_embedding   LD-ZNet's attention pools: (C, tokens) -> (tokens, C)
  batch_stats/.../mean, var             <- running_mean, running_var
PyTorch ConvTranspose2d weights are (in, out, kh, kw) where a Conv2d's are (out, in, kh, kw); the keys named by
`transposed_convs` are swapped to the Conv2d layout first, so that the one kernel rule gives our (kh, kw, in, out).
One `WeightLoadingError` lists every missing, unexpected, mis-shaped and non-finite key of both collections.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax.weights.convert import TORCH_LEAF, WeightLoadingError, convert_state_dict, torch_key_of, torch_module_path

# (collection, Flax leaf) -> (torch leaf, whether the PyTorch layout is the transpose of ours) for the leaves
# convert_state_dict does not know.
_PLAIN_LEAVES: dict[tuple[str, str], tuple[str, bool]] = {
    ("params", "gamma"): ("gamma", False),
    ("params", "positional_embedding"): ("positional_embedding", True),
    ("batch_stats", "mean"): ("running_mean", False),
    ("batch_stats", "var"): ("running_var", False),
}


def convert_variables(state: Mapping[str, np.ndarray], target: Mapping[str, Any], *, source: str,
                      key_origin: Mapping[str, str] | None = None,
                      transposed_convs: Iterable[str] = ()) -> dict:
    """{'params': ..., 'batch_stats': ...} (numpy, the structure of `target`, an abstract variables tree) from a
    state dict already renamed to our modules' torch spelling (`head.decoder.conv_layers.1.running_mean`).

    `transposed_convs` are regexes of the (renamed) ConvTranspose2d weight keys. Raises WeightLoadingError.
    """
    origin = dict(key_origin or {})
    patterns = [re.compile(p) for p in transposed_convs]
    remaining = {k: (np.swapaxes(v, 0, 1) if np.ndim(v) == 4 and any(p.fullmatch(k) for p in patterns) else v)
                 for k, v in state.items()}
    by_module = {torch_module_path(key): key for key in remaining}
    missing, mismatched, nonfinite, standard, plain = [], [], [], {}, {}
    for (collection, *path), leaf in flatten_dict(dict(target)).items():
        path = tuple(path)
        rule = _PLAIN_LEAVES.get((collection, path[-1]))
        if rule is None:
            if collection != "params" or path[-1] not in TORCH_LEAF:
                raise ValueError(f"convert_variables: no PyTorch name for {collection}/{'/'.join(path)}")
            standard[path] = leaf
            continue
        torch_leaf, transposed = rule
        torch_shape = tuple(leaf.shape)[::-1] if transposed else tuple(leaf.shape)
        key = by_module.get((path[:-1], torch_leaf))
        if key is None:
            missing.append((torch_key_of(path[:-1] + (torch_leaf,)), torch_shape))
            continue
        value = np.asarray(remaining.pop(key))
        if value.shape != torch_shape:
            mismatched.append((origin.get(key, key), value.shape, torch_shape))
            continue
        value = np.asarray(value.T if transposed else value, leaf.dtype)
        bad = value.size - np.count_nonzero(np.isfinite(value))
        if bad:
            nonfinite.append((origin.get(key, key), int(bad), int(value.size)))
        plain[(collection, *path)] = value
    try:
        params = convert_state_dict(remaining, unflatten_dict(standard), source=source, key_origin=origin)
    except WeightLoadingError as err:
        raise WeightLoadingError(source, sorted(missing + err.missing), err.unexpected,
                                 sorted(mismatched + err.mismatched), sorted(nonfinite + err.nonfinite)) from None
    if missing or mismatched or nonfinite:
        raise WeightLoadingError(source, sorted(missing), (), sorted(mismatched), sorted(nonfinite))
    flat = {("params", *path): value for path, value in flatten_dict(params).items()}
    flat.update(plain)
    return {collection: {} for collection in target} | unflatten_dict(flat)
