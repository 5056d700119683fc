"""Strict conversion of a PyTorch-named state dict (numpy arrays) into a Flax parameter tree.

The Flax tree (from `jax.eval_shape` of the module's init) drives the conversion. Names follow one rule:
the torch key is split on '.', a numeric component is merged into the one before it with '_'
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/...`), and the torch leaf `weight`
becomes `kernel` (conv, dense), `scale` (norms) or `embedding` (embeddings); `bias` stays.
Conv kernels go OIHW -> HWIO, linear weights (out, in) -> (in, out). A 1x1 conv weight loads into a dense
kernel and vice versa (ldm stores some linear maps as 1x1 convs; the maps are identical).

Every missing, unexpected, mis-shaped and non-finite (NaN / inf: a corrupt file) key is collected and raised as one
`WeightLoadingError` naming the file.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# Flax leaf name -> PyTorch leaf name.
TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Module names that end in `_<digits>` without being a list index; only used to spell torch names in errors.
NAMES_WITH_DIGIT_SUFFIX = frozenset({"linear_1", "linear_2"})

_INDEXED = re.compile(r"(.+)_(\d+)")


class WeightLoadingError(ValueError):
    """A state dict does not fit a model. Lists every missing, unexpected, mis-shaped and non-finite key.

    Unexpected, mis-shaped and non-finite keys are named as in the file; missing keys in the canonical PyTorch
    naming of the model (diffusers / transformers 4.x), since the file has no name for them.
    """

    def __init__(self, source: str, missing: Sequence[tuple[str, tuple[int, ...]]] = (),
                 unexpected: Sequence[tuple[str, tuple[int, ...]]] = (),
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
                 nonfinite: Sequence[tuple[str, int, int]] = ()):
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.nonfinite = list(nonfinite)
        lines = [f"cannot load {source}: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} mis-shaped key(s) (shapes in PyTorch layout)"
                 + (f", {len(self.nonfinite)} with NaN or infinite values (a corrupt file?)" if self.nonfinite else "")]
        lines += [f"  missing     {key}: model expects {shape}" for key, shape in self.missing]
        lines += [f"  unexpected  {key}: {shape} in the file" for key, shape in self.unexpected]
        lines += [f"  mis-shaped  {key}: {got} in the file, model expects {want}"
                  for key, got, want in self.mismatched]
        lines += [f"  non-finite  {key}: {bad} of {size} values" for key, bad, size in self.nonfinite]
        super().__init__("\n".join(lines))


def torch_module_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    """`a.0.b.weight` -> (('a_0', 'b'), 'weight')."""
    *modules, leaf = torch_key.split(".")
    merged: list[str] = []
    for part in modules:
        if part.isdigit() and merged:
            merged[-1] = f"{merged[-1]}_{part}"
        else:
            merged.append(part)
    return tuple(merged), leaf


def torch_key_of(flax_path: Sequence[str]) -> str:
    """Best-effort torch spelling of a Flax parameter path, for error messages only (matching never uses it)."""
    *modules, leaf = flax_path
    parts = []
    for name in modules:
        match = _INDEXED.fullmatch(name)
        parts.append(f"{match[1]}.{match[2]}" if match and name not in NAMES_WITH_DIGIT_SUFFIX else name)
    return ".".join(parts + [TORCH_LEAF.get(leaf, leaf)])


def _torch_layout_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if flax_leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if flax_leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(flax_leaf: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
    """The torch tensor in Flax layout, or None when its shape cannot be the Flax leaf's."""
    if flax_leaf == "kernel":
        if value.ndim == 4 and len(flax_shape) == 2 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        elif value.ndim == 2 and len(flax_shape) == 4 and flax_shape[:2] == (1, 1):
            value = value[:, :, None, None]  # linear -> 1x1 conv
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
    return value if tuple(value.shape) == tuple(flax_shape) else None


def abstract_params(module: nn.Module, *init_args) -> dict:
    """Shapes and dtypes of `module`'s params (unboxed), from `module.dummy_inputs()` when no args are given."""
    args = init_args or module.dummy_inputs()
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return nn.meta.unbox(variables)["params"]


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    source: str,
    ignore: Iterable[str] = (),
    key_origin: Mapping[str, str] | None = None,
) -> dict:
    """Build the Flax params for `target` (an abstract param tree) from a torch-named `state_dict`.

    Args:
      state_dict: torch key -> array (any float dtype; cast to the target leaf's dtype).
      target: nested dict of `jax.ShapeDtypeStruct` (see `abstract_params`).
      source: what the state dict was read from, for the error message.
      ignore: regexes (matched at the start of the torch key) for keys that are deliberately not loaded,
        e.g. a VAE's decoder. Each caller lists them explicitly.
      key_origin: torch key -> the name it has in the file, when the caller renamed keys (CompVis layout).
    Returns:
      A plain nested dict of numpy arrays with the structure of `target`.
    Raises:
      WeightLoadingError listing every missing, unexpected, mis-shaped and non-finite key (checking finiteness is
      one more pass over the weights: a NaN in a file would otherwise show only as a NaN loss).
    """
    ignore_patterns = [re.compile(p) for p in ignore]
    origin = key_origin or {}
    by_module: dict[tuple[tuple[str, ...], str], str] = {}
    colliding = []  # a second key with the same Flax name (e.g. `a.0.b` and `a_0.b`) cannot be loaded
    for key in state_dict:
        if any(p.match(key) for p in ignore_patterns):
            continue
        name = torch_module_path(key)
        if name in by_module:
            colliding.append(key)
        else:
            by_module[name] = key

    params, missing, mismatched, nonfinite = {}, [], [], []
    for path, leaf in flatten_dict(dict(target)).items():
        flax_leaf = path[-1]
        if flax_leaf not in TORCH_LEAF:
            raise ValueError(f"convert_state_dict: no torch name for Flax leaf {'/'.join(path)!r}")
        torch_key = by_module.pop((tuple(path[:-1]), TORCH_LEAF[flax_leaf]), None)
        expected = _torch_layout_shape(flax_leaf, tuple(leaf.shape))
        if torch_key is None:
            missing.append((torch_key_of(path), expected))
            continue
        value = np.asarray(state_dict[torch_key])
        converted = _to_flax(flax_leaf, value, tuple(leaf.shape))
        if converted is None:
            mismatched.append((origin.get(torch_key, torch_key), tuple(value.shape), expected))
            continue
        try:
            params[path] = np.asarray(converted, dtype=leaf.dtype)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot load {source}: {origin.get(torch_key, torch_key)} holds {value.dtype} values "
                             f"that do not convert to {leaf.dtype} ({err})") from err
        bad = params[path].size - np.count_nonzero(np.isfinite(params[path]))
        if bad:
            nonfinite.append((origin.get(torch_key, torch_key), int(bad), int(params[path].size)))
    unexpected = sorted((origin.get(key, key), tuple(np.shape(state_dict[key])))
                        for key in [*by_module.values(), *colliding])
    if missing or unexpected or mismatched or nonfinite:
        raise WeightLoadingError(source, sorted(missing), unexpected, sorted(mismatched), sorted(nonfinite))
    return unflatten_dict(params)
