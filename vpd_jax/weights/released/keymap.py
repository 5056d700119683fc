"""The parts every released-checkpoint key map is built from: routes (a file prefix -> one of our subtrees, with
the ldm renaming where the subtree is an SD UNet or VAE) and the commented list of keys deliberately not loaded.

A file key goes through three outcomes: dropped (it matches a `Drop`, whose reason is kept for the report),
routed (renamed to our modules' torch spelling, `unet.down_blocks.0.resnets.0.conv1.weight`), or neither: it keeps
its name, matches no parameter of ours, and the strict conversion reports it as unexpected.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from vpd_jax.weights import ldm

StateDict = dict[str, np.ndarray]
Renamer = Callable[[StateDict], tuple[StateDict, dict[str, str]]]  # sub-dict -> (renamed, new -> old)


@dataclasses.dataclass(frozen=True)
class Route:
    """File keys starting with `prefix` (the whole key when it does not end in '.') become `target` + the rest,
    renamed by `rename` when given (ldm UNet / VAE layouts)."""

    prefix: str
    target: str
    rename: Renamer | None = None

    def matches(self, key: str) -> bool:
        return key.startswith(self.prefix) if self.prefix.endswith(".") else key == self.prefix


@dataclasses.dataclass(frozen=True)
class Drop:
    """File keys (or their routed names) matching `pattern` in full are not loaded, for the reason `why`."""

    pattern: str
    why: str

    def matches(self, *names: str) -> bool:
        return any(re.fullmatch(self.pattern, name) for name in names)


@dataclasses.dataclass
class Mapped:
    """A released state dict in our modules' torch spelling."""

    renamed: StateDict  # our name -> array
    origin: dict[str, str]  # our name -> the file's key
    dropped: dict[str, str]  # file key -> why it is not loaded
    constants: dict[str, np.ndarray]  # e.g. the class-embedding buffer


def ldm_unet(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    return ldm.unet_ldm_to_diffusers(state)


def ldm_vae(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    return ldm.vae_ldm_to_diffusers(state)


def apply_routes(state: Mapping[str, np.ndarray], routes: Iterable[Route], drops: Iterable[Drop],
                 origin: Mapping[str, str] | None = None) -> tuple[StateDict, dict[str, str], dict[str, str]]:
    """(renamed, our name -> file key, dropped file key -> reason). `origin` names the file key behind a key of
    `state` when a key map replaced it (LD-ZNet's EMA copy)."""
    routes, drops = tuple(routes), tuple(drops)
    origin = dict(origin or {})
    file_key = lambda key: origin.get(key, key)  # noqa: E731
    renamed, new_origin, dropped = {}, {}, {}
    groups: dict[Route, StateDict] = {}
    for key, value in state.items():
        route = next((r for r in routes if r.matches(key)), None)
        if route is None:
            why = next((d.why for d in drops if d.matches(key)), None)
            if why is not None:
                dropped[file_key(key)] = why
            else:  # unmapped: keeps its name, reported as unexpected by the strict conversion
                renamed[key], new_origin[key] = value, file_key(key)
            continue
        groups.setdefault(route, {})[key[len(route.prefix):] if route.prefix.endswith(".") else ""] = value
    for route, sub in groups.items():
        names, sub_origin = route.rename(sub) if route.rename else (sub, {k: k for k in sub})
        for name, value in names.items():
            key = route.prefix + sub_origin.get(name, name) if route.prefix.endswith(".") else route.prefix
            ours = route.target + name if route.prefix.endswith(".") else route.target
            why = next((d.why for d in drops if d.matches(key, ours)), None)
            if why is not None:
                dropped[file_key(key)] = why
            else:
                renamed[ours], new_origin[ours] = value, file_key(key)
    return renamed, new_origin, dropped


@dataclasses.dataclass(frozen=True)
class ReleasedFormat:
    """One kind of released checkpoint: its container, how its keys map onto our task model's variables.

    state_key          where the container keeps the state dict ('state_dict', 'model')
    strip_ddp_prefix   remove DistributedDataParallel's 'module.' prefix when every key has it
    routes, drops      the key map (module docstring)
    constants          our constant -> file key of a buffer that is an input of ours (class embeddings)
    transposed_convs   regexes of routed ConvTranspose2d weights ((in, out, kh, kw) in PyTorch)
    signature          key prefixes every file of this kind has: a file without them is another task's
    not_in_file        our top-level subtrees the file does not hold (frozen parts the original loads elsewhere)
    select             (state dict, use_ema) -> (state dict, key -> file key, file key -> why dropped),
                       applied first (LD-ZNet: EMA or live weights)
    partial_subtrees   our subtree -> why: its routed keys whose top-level module the model does not hold are
                       dropped (LD-ZNet's frozen UNet after the last tap)
    """

    task: str
    description: str
    state_key: str
    routes: tuple[Route, ...]
    drops: tuple[Drop, ...]
    signature: tuple[str, ...]
    constants: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transposed_convs: tuple[str, ...] = ()
    strip_ddp_prefix: bool = False
    not_in_file: tuple[str, ...] = ()
    select: Callable[..., tuple[StateDict, dict[str, str], dict[str, str]]] | None = None
    partial_subtrees: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def missing_signature(self, keys: Iterable[str]) -> list[str]:
        keys = tuple(keys)
        return [p for p in self.signature if not any(k.startswith(p) for k in keys)]
