"""Device mesh, logical-axis rules and sharded state creation.

Every parameter is created with logical axis names (`vpd_jax.models.layers`); the rules below map them to
the mesh axes ('data', 'fsdp', 'tensor'). A dimension whose size is not divisible by the mesh axes it maps to
stays unsharded on that dimension (e.g. the 4 input channels of the UNet's conv_in on fsdp=8), so one rule set
serves every model size and mesh shape.

Parameter vocabulary:
  conv_h, conv_w      spatial kernel dims (never sharded)
  conv_in, embed      input features of a conv / dense layer       -> 'fsdp'
  conv_out, mlp,      output features, attention heads             -> 'tensor'
  heads
  norm                norm scales and biases                        -> replicated
  vocab, pos          embedding tables                              -> 'tensor' / replicated
Activation vocabulary: act_batch -> ('data', 'fsdp'); act_h, act_w, act_ch, act_len, act_embed -> unsharded.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_h", None),
    ("act_w", None),
    ("act_ch", None),
    ("act_len", None),
    ("act_embed", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", "fsdp"),
    ("embed", "fsdp"),
    ("conv_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("pos", None),
    ("norm", None),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES from a {'data': ..., 'fsdp': ..., 'tensor': ...} mapping; one size may be -1."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (GSPMD propagation, the classic pjit behaviour)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def divisible_spec(mesh_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Per dimension, drop mesh axes of size 1 and the trailing mesh axes that do not divide the dimension."""
    entries = list(mesh_spec) + [None] * (len(shape) - len(mesh_spec))
    out = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        names = tuple(n for n in names if mesh.shape[n] > 1)
        while names and dim % math.prod(mesh.shape[n] for n in names):
            names = names[:-1]
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) arrays or shape structs.

    Leaves without logical names are replicated. The result has the unboxed tree's structure.
    """

    def to_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            logical = PartitionSpec(*leaf.names)
            value = leaf.value
            mesh_spec = nn.logical_to_mesh_axes(logical, rules)
        else:
            value, mesh_spec = leaf, PartitionSpec()
        return NamedSharding(mesh, divisible_spec(mesh_spec, np.shape(value), mesh))

    return jax.tree.map(to_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules: Rules = DEFAULT_RULES) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (returning boxed variables) with its outputs created directly in their shards.

    Returns (unboxed variables, their NamedShardings). No full copy of the state is ever materialised.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(abstract, mesh, rules)

    def unboxed_init(*a):
        return nn.meta.unbox(init_fn(*a))

    with nn.logical_axis_rules(rules):
        variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return variables, shardings


def logical_rules_context(rules: Rules = DEFAULT_RULES):
    """Context under which `nn.with_logical_constraint` on activations resolves to mesh axes."""
    return nn.logical_axis_rules(rules)


def device_batch(batch: Mapping[str, Any], sharding: NamedSharding) -> dict:
    """Per-host numpy batch -> global arrays sharded over the batch axis (strings stay on the host)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
            if np.asarray(v).dtype.kind in "biuf"}


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array into its shards (each device gets only its slice)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
