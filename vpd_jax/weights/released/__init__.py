"""The authors' released task models (VPD segmentation / depth / referring segmentation, LD-ZNet) as our
variables: `read_released` reads a file without running pickled code and checks it is the task's,
`convert_released` maps every key strictly onto a model's variables tree, `released_variables` adds what the file
does not hold (refer's CLIP text encoder).

    state = read_released("vpd_seg.pth", "seg")
    variables, mapped = convert_released(state, "seg", abstract_variables, source="vpd_seg.pth")
    mapped.constants["class_embeddings"], mapped.dropped   # the buffer the task takes as input; what was skipped

Every key of the file is mapped, or on its format's commented drop list (`vpd_jax/weights/released/vpd.py`,
`ldznet.py`); anything else, and every parameter of ours the file lacks, is one WeightLoadingError that lists them.
docs/released_checkpoints.md tabulates the rules; vpd_jax/apps/import_released.py writes a run directory from a file.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict

from vpd_jax.weights.convert import torch_module_path
from vpd_jax.weights.loaders import load_text_encoder
from vpd_jax.weights.released.container import ReleasedCheckpointError, read_archive, state_dict_of
from vpd_jax.weights.released.keymap import Mapped, ReleasedFormat, StateDict, apply_routes
from vpd_jax.weights.released.ldznet import LDZNET
from vpd_jax.weights.released.variables import convert_variables
from vpd_jax.weights.released.vpd import DEPTH, REFER, SEG

FORMATS: dict[str, ReleasedFormat] = {f.task: f for f in (SEG, DEPTH, REFER, LDZNET)}


def released_format(task: str) -> ReleasedFormat:
    if task not in FORMATS:
        raise ValueError(f"no released checkpoint format for task {task!r}; formats: {sorted(FORMATS)}")
    return FORMATS[task]


def read_released(path: str, task: str) -> StateDict:
    """The state dict of a released `task` checkpoint at `path` (numpy arrays). A file of another task, or one
    that is not a released container, is a ReleasedCheckpointError naming what it lacks."""
    fmt = released_format(task)
    container = read_archive(path)
    keys = container.get(fmt.state_key) if isinstance(container, dict) else None
    if not isinstance(keys, dict):
        raise ReleasedCheckpointError(_not_this_task(path, fmt, container))
    state = state_dict_of(container, fmt.state_key, path, strip_ddp_prefix=fmt.strip_ddp_prefix)
    if fmt.missing_signature(state):
        raise ReleasedCheckpointError(_not_this_task(path, fmt, container, state))
    return state


def _not_this_task(path: str, fmt: ReleasedFormat, container: Any, state: Mapping | None = None) -> str:
    lines = [f"{path} is not a released {fmt.description}"]
    if state is None:
        found = sorted(container) if isinstance(container, dict) else type(container).__name__
        lines.append(f"expected the state dict under {fmt.state_key!r}; the file holds {found}")
    else:
        lines.append(f"its state dict has no {fmt.missing_signature(state)} keys")
    for other in FORMATS.values():
        if other is not fmt and isinstance(container, dict) and isinstance(container.get(other.state_key), dict):
            keys = container[other.state_key]
            if other.strip_ddp_prefix and all(k.startswith("module.") for k in keys):
                keys = [k[len("module."):] for k in keys]
            if not other.missing_signature(keys):
                lines.append(f"it looks like a {other.description}: import it with task {other.task!r}")
    return "; ".join(lines)


def released_constants(state: Mapping, task: str) -> dict[str, np.ndarray]:
    """The buffers of a released `task` state dict that the task takes as inputs (VPD's class embeddings)."""
    fmt = released_format(task)
    absent = sorted(key for key in fmt.constants.values() if key not in state)
    if absent:
        raise ReleasedCheckpointError(f"the {fmt.description} has no {absent} buffer(s)")
    return {name: np.asarray(state[key]) for name, key in fmt.constants.items()}


def map_released(state: Mapping, task: str, target: Mapping[str, Any], *, use_ema: bool = True) -> Mapped:
    """The file's keys in our modules' torch spelling, what is dropped and why, and the constants (buffers the
    task takes as inputs). `target` is the model's abstract variables tree (for the partial subtrees)."""
    fmt = released_format(task)
    constants = released_constants(state, task)
    state = {k: v for k, v in state.items() if k not in fmt.constants.values()}
    origin, dropped = {}, {}
    if fmt.select is not None:
        try:
            state, origin, dropped = fmt.select(state, use_ema)
        except ValueError as err:
            raise ReleasedCheckpointError(f"the {fmt.description}: {err}") from None
    renamed, origin, routed_drops = apply_routes(state, fmt.routes, fmt.drops, origin)
    dropped.update(routed_drops)
    params = target.get("params", {})
    for subtree, why in fmt.partial_subtrees.items():
        held = set(params.get(subtree, {}))
        for key in [k for k in renamed if k.startswith(subtree + ".")]:
            if torch_module_path(key[len(subtree) + 1:])[0][0] not in held:
                dropped[origin.pop(key)] = why
                del renamed[key]
    return Mapped(renamed, origin, dropped, constants)


def convert_released(state: Mapping, task: str, target: Mapping[str, Any], *, source: str,
                     use_ema: bool = True) -> tuple[dict, Mapped]:
    """({'params', 'batch_stats'} numpy trees of `target`'s structure, the Mapped record) from a released state
    dict. The subtrees the format says are not in the file (`not_in_file`, e.g. refer's CLIP) are left out of
    the result; the caller provides them. Raises WeightLoadingError listing every unmapped, missing and
    mis-shaped key."""
    fmt = released_format(task)
    mapped = map_released(state, task, target, use_ema=use_ema)
    target = {collection: {k: v for k, v in tree.items() if k not in fmt.not_in_file}
              for collection, tree in target.items()}
    variables = convert_variables(mapped.renamed, target, source=source, key_origin=mapped.origin,
                                  transposed_convs=fmt.transposed_convs)
    return variables, mapped


def released_variables(state: Mapping, task: str, target: Mapping[str, Any], *, source: str, use_ema: bool = True,
                       text_encoder: str = "") -> tuple[dict, Mapped]:
    """The whole variables tree of `target` from a released state dict: `convert_released`, plus what the file
    does not hold: refer's frozen CLIP text encoder, from `text_encoder` (a CLIP text model folder or an SD
    pipeline root), whose shapes must be the model's."""
    fmt = released_format(task)
    variables, mapped = convert_released(state, task, target, source=source, use_ema=use_ema)
    for subtree in fmt.not_in_file:  # the text encoder
        if not text_encoder:
            raise ValueError(f"{source} holds no CLIP text encoder (the original loads its own): give a CLIP text "
                             "model folder (openai/clip-vit-large-patch14) or a Stable Diffusion v1.5 pipeline root")
        with nn.logical_axis_rules(()):
            _, params = load_text_encoder(text_encoder, on_host=True)
        want = {k: v.shape for k, v in flatten_dict(target["params"][subtree]).items()}
        have = {k: v.shape for k, v in flatten_dict(params).items()}
        differ = sorted("/".join(k) for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if differ:
            raise ValueError(f"the text encoder at {text_encoder} does not fit the model: {differ[:10]}")
        variables["params"][subtree] = params
    return variables, mapped


__all__ = ["FORMATS", "Mapped", "ReleasedCheckpointError", "ReleasedFormat", "convert_released", "map_released",
           "read_archive", "read_released", "released_constants", "released_format", "released_variables"]
