"""Parameter groups: ordered path rules -> per-parameter lr multiplier, weight-decay multiplier, or frozen.

A rule matches a parameter when its regex is found (`re.search`) in the '/'-joined path of the parameter inside
the `params` collection (`unet/down_blocks_0/attentions_1/norm/scale`) and, if `vectors_and_biases` is set, the
parameter is at most 1-D or its leaf is named `bias`. Rules are tried in order and the first match decides;
a parameter no rule matches gets lr x1 and wd x1. A rule that matches no parameter at all is an error (a typo,
or a preset applied to the wrong model), unless it is marked `required=False`.

Frozen parameters get no gradient, no optimizer state and no update: `split_params` separates them so the train
step differentiates only the trainable tree.

The presets reproduce the reference optimisers, which group by substrings of the *reference* (CompVis ldm / torch)
parameter names. Those substrings do not carry over to our diffusers-style names (a ResBlock GroupNorm is
`resnets_0/norm1` here but `in_layers.0` in ldm), so each preset is written as explicit regexes on our paths, and
tests/test_optim.py checks every preset against the reference rule applied to the ldm names.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vpd_jax.models.unet_config import OUTPUT_HEAD_PARAMS

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """One parameter-group rule. `frozen` ignores the multipliers."""

    pattern: str
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    frozen: bool = False
    vectors_and_biases: bool = False  # also require ndim <= 1 or a leaf named `bias` (torch's "1-D or .bias")
    required: bool = True  # False: matching no parameter is allowed (a module some model variants lack)

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"parameter rule {self}: invalid regex {self.pattern!r}: {e}") from None
        if self.lr_mult < 0 or self.wd_mult < 0:
            raise ValueError(f"parameter rule {self}: lr_mult and wd_mult must be >= 0")
        if self.lr_mult == 0 and not self.frozen:
            raise ValueError(f"parameter rule {self}: lr_mult=0 would keep optimizer state for a parameter that "
                             "never changes; write frozen=True instead")

    def matches(self, path: str, shape: tuple[int, ...]) -> bool:
        if self.vectors_and_biases and not (len(shape) <= 1 or path.rsplit("/", 1)[-1] == "bias"):
            return False
        return re.search(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """What a parameter gets: `rule` is the index of the deciding rule, or None for the default (x1, x1)."""

    lr_mult: float
    wd_mult: float
    frozen: bool
    rule: int | None


DEFAULT_GROUP = ParamGroup(lr_mult=1.0, wd_mult=1.0, frozen=False, rule=None)

# UNet parameters whose CompVis ldm name contains "norm": each SpatialTransformer's GroupNorm (`attentions_j/norm`)
# and the transformer blocks' LayerNorms (`norm1/2/3`). Not the ResBlock GroupNorms (ldm `in_layers.0` /
# `out_layers.0`, ours `resnets_j/norm1|norm2`) and not `conv_norm_out` (ldm `out.0`). docs/reference.md,
# "Segmentation optimiser" and "Referring loss and optimiser".
_UNET_LDM_NORM = r"^unet/.*/(attentions_\d+/norm|transformer_blocks_\d+/norm[123])/"
# The UNet's final `out` head (conv_norm_out, conv_out) is never applied by VPD (docs/reference.md, "VPD backbone"):
# torch gives it no gradient, so AdamW skips it entirely (no decay either), and depth deletes it. Frozen here has the
# same effect. Not required: a UNet initialised without its output head has no such parameters.
_UNET_UNUSED_OUT = ParamRule(rf"^unet/({'|'.join(OUTPUT_HEAD_PARAMS)})/", frozen=True, required=False)

PARAM_GROUPS: dict[str, tuple[ParamRule, ...]] = {
    # docs/reference.md, "Segmentation optimiser": mmcv custom_keys tried longest first (encoder_vq, norm, unet);
    # "norm" -> lr x1, wd 0; "unet" -> lr x0.1; everything else (text adapter, gamma, FPN, head incl. BN and biases)
    # lr x1, wd x1.
    "vpd_seg": (
        ParamRule(r"^vae/", frozen=True),
        _UNET_UNUSED_OUT,
        ParamRule(_UNET_LDM_NORM, lr_mult=1.0, wd_mult=0.0),
        ParamRule(r"^unet/", lr_mult=0.1),
    ),
    # docs/reference.md, "Depth optimiser": "unet" -> lr x0.01; no decay for 1-D params and biases; VAE excluded.
    "vpd_depth": (
        ParamRule(r"^vae/", frozen=True),
        _UNET_UNUSED_OUT,
        ParamRule(r"^unet/", lr_mult=0.01, wd_mult=0.0, vectors_and_biases=True),
        ParamRule(r"^unet/", lr_mult=0.01),
        ParamRule(r"", wd_mult=0.0, vectors_and_biases=True),
    ),
    # docs/reference.md, "Referring loss and optimiser": lr_scale is ignored by torch, so the UNet trains at x1; UNet
    # "norm" params have no decay; VAE and CLIP frozen.
    "vpd_refer": (
        ParamRule(r"^(vae|text_encoder)/", frozen=True),
        _UNET_UNUSED_OUT,
        ParamRule(_UNET_LDM_NORM, wd_mult=0.0),
    ),
    # docs/reference.md, "LD-ZNet optimiser and learning rate": AdamW wd 0.01 on everything trained (ZNet incl. its head
    # and injection modules); VAE, CLIP and the SD feature UNet frozen.
    "ldznet": (
        ParamRule(r"^(vae|text_encoder|sd_unet)/", frozen=True),
    ),
    # The feature probes (vpd_jax/models/probe.py): only the decoders train; the SD parts are frozen.
    "probe": (
        ParamRule(r"^(vae|text_encoder|unet)/", frozen=True),
    ),
    # Everything trains with the same lr and decay.
    "all": (),
}

_RULE_FIELDS = {f.name for f in dataclasses.fields(ParamRule)}


def resolve_rules(spec: str | Sequence[Any]) -> tuple[ParamRule, ...]:
    """Rules from a preset name or a sequence of ParamRule / mappings with ParamRule's fields."""
    if isinstance(spec, str):
        if spec not in PARAM_GROUPS:
            raise ValueError(f"unknown param_groups preset {spec!r}; presets: {sorted(PARAM_GROUPS)}")
        return PARAM_GROUPS[spec]
    rules = []
    for i, item in enumerate(spec):
        if isinstance(item, ParamRule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping) and hasattr(item, "to_dict"):  # ml_collections.ConfigDict
            item = item.to_dict()
        if not isinstance(item, Mapping):
            raise ValueError(f"param_groups[{i}]: expected a mapping with fields {sorted(_RULE_FIELDS)}, got {item!r}")
        unknown = sorted(set(item) - _RULE_FIELDS)
        if unknown or "pattern" not in item:
            raise ValueError(f"param_groups[{i}] = {dict(item)}: unknown fields {unknown} / missing 'pattern'; "
                             f"fields: {sorted(_RULE_FIELDS)}")
        rules.append(ParamRule(**item))
    return tuple(rules)


def _shape(leaf: Any) -> tuple[int, ...]:
    """Shape of an array, a ShapeDtypeStruct or a logically-partitioned box of either."""
    if isinstance(leaf, nn.meta.AxisMetadata):
        leaf = leaf.unbox()
    return tuple(np.shape(leaf))


def _flat(params: Mapping[str, Any]) -> dict[Path, Any]:
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"expected a non-empty nested dict of parameters, got {type(params).__name__}")
    return flatten_dict(dict(params))


def assign_groups(params: Mapping[str, Any], rules: Sequence[ParamRule]) -> dict[str, ParamGroup]:
    """'/'-joined path -> ParamGroup for every parameter. Raises if a required rule matches no parameter."""
    groups, matched = {}, [False] * len(rules)
    for path, leaf in _flat(params).items():
        name, shape = "/".join(path), _shape(leaf)
        hits = [i for i, rule in enumerate(rules) if rule.matches(name, shape)]
        for i in hits:
            matched[i] = True
        if hits:
            rule = rules[hits[0]]
            groups[name] = ParamGroup(rule.lr_mult, rule.wd_mult, rule.frozen, hits[0])
        else:
            groups[name] = DEFAULT_GROUP
    unmatched = [f"  [{i}] {rule}" for i, rule in enumerate(rules) if rule.required and not matched[i]]
    if unmatched:
        examples = ", ".join(list(groups)[:5])
        raise ValueError("parameter rules that match no parameter (a typo, or rules for another model?):\n"
                         + "\n".join(unmatched) + f"\nparameter paths look like: {examples}, ...")
    return groups


def trainable_mask(params: Mapping[str, Any], rules: Sequence[ParamRule]) -> dict:
    """A tree like `params` with True for trainable and False for frozen parameters."""
    groups = assign_groups(params, rules)
    return unflatten_dict({path: not groups["/".join(path)].frozen for path in _flat(params)})


def split_params(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the parameters `mask` marks True / False.

    Subtrees left empty are dropped, so the frozen VAE is absent from the trainable tree rather than present as
    empty dicts. `merge_params` inverts this.
    """
    flat_mask = _flat(mask)
    flat = _flat(params)
    if flat.keys() != flat_mask.keys():
        diff = sorted("/".join(p) for p in flat.keys() ^ flat_mask.keys())
        raise ValueError(f"params and mask have different parameters, e.g. {diff[:5]}")
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def merge_params(*trees: Mapping[str, Any]) -> dict:
    """The union of disjoint parameter trees (e.g. trainable and frozen). Overlapping paths are an error."""
    merged: dict[Path, Any] = {}
    for tree in trees:
        for path, leaf in flatten_dict(dict(tree)).items():
            if path in merged:
                raise ValueError(f"parameter {'/'.join(path)} is in more than one tree")
            merged[path] = leaf
    return unflatten_dict(merged)


def describe_groups(groups: Mapping[str, ParamGroup], params: Mapping[str, Any] | None = None) -> str:
    """A short table: one line per distinct (lr_mult, wd_mult | frozen) with its parameter count (and sizes)."""
    sizes = {"/".join(p): int(np.prod(_shape(v))) for p, v in _flat(params).items()} if params is not None else {}
    table: dict[tuple, list[str]] = {}
    for name, group in groups.items():
        key = ("frozen",) if group.frozen else (group.lr_mult, group.wd_mult)
        table.setdefault(key, []).append(name)
    lines = []
    for key, names in sorted(table.items(), key=lambda kv: str(kv[0])):
        what = "frozen" if key == ("frozen",) else f"lr x{key[0]:g}, wd x{key[1]:g}"
        size = f", {sum(sizes.get(n, 0) for n in names):,} values" if sizes else ""
        lines.append(f"{what}: {len(names)} params{size}, e.g. {names[0]}")
    return "\n".join(lines)


def group_trees(groups: Mapping[str, ParamGroup], trainable_paths: Iterable[Path]) -> tuple[dict, dict]:
    """(lr_mult tree, wd_mult tree) of Python floats over the trainable parameters."""
    paths = list(trainable_paths)
    lr = unflatten_dict({p: float(groups["/".join(p)].lr_mult) for p in paths})
    wd = unflatten_dict({p: float(groups["/".join(p)].wd_mult) for p in paths})
    return lr, wd
