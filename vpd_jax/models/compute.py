"""How a model computes, as opposed to what it computes: one frozen `Compute` for the task models and the UNet.

Fields (the `config.compute` section holds the same names as strings; `Compute.from_config` reads it):
  dtype                   compute dtype of activations and matmuls: float32 | bfloat16. Normalisations and
                          softmax run in float32 either way.
  param_dtype             dtype of the stored parameters: float32 | bfloat16.
  remat_policy            None (no rematerialisation) or a name in REMAT_POLICIES, applied per UNet block.
  attention_query_chunk   0: every attention layer attends all its queries at once (as the references). N > 0:
                          the UNet's layers that record no map and have more than N keys (self-attention)
                          attend N queries at a time (our core: loops with a flash-attention-style backward pass,
                          `vpd_jax.models.chunked_attention`): the same result with one chunk's scores in memory at
                          a time.
                          (The Pallas kernels tile the queries themselves and ignore it.)
  attention               the kernel of the UNet's attention layers that record no map:
                            'xla'          our heads-first core with its written-out backward pass (default)
                            'dot_product'  jax.nn.dot_product_attention, JAX's choice of implementation
                            'cudnn'        jax.nn.dot_product_attention's cuDNN flash kernel (GPUs only)
                            'splash'       JAX's Pallas splash attention kernel (TPUs only)
                            'flash'        JAX's Pallas flash attention kernel (TPUs only)
  map_attention           the kernel of the attention layers that record a map (VPD's cross-attention maps):
                            'xla'          our core, which returns the probabilities (default)
                            'pallas'       our fused Pallas kernel: output and head-averaged map in one pass,
                                           never writing the per-head probabilities out (TPUs only)
  attention_block_q       query and key tile sizes of the Pallas kernels (multiples of 128; a sequence shorter
  attention_block_kv      than a tile is one tile; the map kernel holds all keys at once). Forward and backward
                          passes use the same tiles.
  pallas_interpret        run the Pallas kernels in the Pallas interpreter, on any platform: slow, for tests and
                          for checking a TPU configuration on a CPU.
  matmul_precision        precision of float32 matmuls and convolutions while the model is traced:
                          'default' (the platform's: bfloat16 passes on a TPU, TF32 on Ampere+ GPUs, full float32
                          on a CPU), 'high', 'highest' (full float32 everywhere). See `trace_scope`.
  conv                    how every `Conv` layer computes (see `vpd_jax.models.convolution`): 'xla' (XLA's
                          convolution), 'matmul' (an im2col matrix product), 'auto' (default: the matrix product
                          where XLA:CPU's convolution is measured slower, XLA's convolution everywhere else).

Leaf layers (Conv, Dense, norms, the VAE, CLIP, heads) keep Flax's usual `dtype` / `param_dtype` fields: they are
built with `**compute.layer_kwargs`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vpd_jax.models import convolution

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs: recompute everything in the backward pass
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
# Attention kernel -> the platform (jax.default_backend()) it needs; None: any.
ATTENTION_KERNELS = {"xla": None, "dot_product": None, "cudnn": "gpu", "splash": "tpu", "flash": "tpu"}
MAP_ATTENTION_KERNELS = {"xla": None, "pallas": "tpu"}
PALLAS_KERNELS = ("splash", "flash", "pallas")  # the kernels `pallas_interpret` runs on any platform
TILE = 128  # the Pallas kernels' tile sizes are multiples of the TPU's 128 lanes
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class PallasOptions:
    """What the Pallas attention kernels take from a `Compute`: tile sizes and the interpreter switch."""

    block_q: int = 512
    block_kv: int = 512
    interpret: bool = False

    def __post_init__(self):
        check_tile("block_q", self.block_q)
        check_tile("block_kv", self.block_kv)


def check_tile(name: str, size: int) -> None:
    if size <= 0 or size % TILE:
        raise ValueError(f"{name}={size} must be a positive multiple of {TILE}")


def current_matmul_precision() -> str | None:
    """The float32 matmul precision in effect where this runs (None: the platform's default). A custom VJP's
    backward pass is traced after the forward pass has left the model's `trace_scope`: it reads this in the
    forward pass and traces its backward pass under `matmul_precision_context` of it."""
    return jax.config.jax_default_matmul_precision


def matmul_precision_context(precision: str | None):
    """A context that sets the float32 matmul precision (nothing for None)."""
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


@dataclasses.dataclass(frozen=True)
class Compute:
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str | None = None
    attention_query_chunk: int = 0
    attention: str = "xla"
    map_attention: str = "xla"
    attention_block_q: int = 512
    attention_block_kv: int = 512
    pallas_interpret: bool = False
    matmul_precision: str = "default"
    conv: str = "auto"

    def __post_init__(self):
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat_policy!r}; valid: None, {', '.join(REMAT_POLICIES)}")
        if self.attention_query_chunk < 0:
            raise ValueError(f"attention_query_chunk={self.attention_query_chunk} must be >= 0 (0: all queries at "
                             "once)")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {self.attention!r}; valid: {tuple(ATTENTION_KERNELS)}")
        if self.map_attention not in MAP_ATTENTION_KERNELS:
            raise ValueError(f"unknown map attention kernel {self.map_attention!r}; valid: "
                             f"{tuple(MAP_ATTENTION_KERNELS)}")
        check_tile("attention_block_q", self.attention_block_q)
        check_tile("attention_block_kv", self.attention_block_kv)
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"unknown matmul precision {self.matmul_precision!r}; valid: {MATMUL_PRECISIONS}")
        convolution.check_implementation(self.conv)

    @property
    def layer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a leaf layer: dtype and param_dtype."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def pallas(self) -> PallasOptions:
        """The Pallas kernels' tile sizes and interpreter switch."""
        return PallasOptions(self.attention_block_q, self.attention_block_kv, self.pallas_interpret)

    @contextlib.contextmanager
    def trace_scope(self):
        """The context a model is traced in: `matmul_precision` (nothing for 'default') and the `conv`
        implementation."""
        with matmul_precision_context(None if self.matmul_precision == "default" else self.matmul_precision), \
                convolution.implementation_context(self.conv):
            yield

    @classmethod
    def from_config(cls, section: Mapping[str, Any], where: str = "config.compute") -> "Compute":
        """From a config section of strings (dtype names, '' for no remat); errors name `where`.<field>."""
        values = dict(section)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; fields: {sorted(fields)}")
        for name in ("dtype", "param_dtype"):
            if name in values:
                if values[name] not in DTYPES:
                    raise ValueError(f"{where}.{name}={values[name]!r}; supported: {sorted(DTYPES)}")
                values[name] = DTYPES[values[name]]
        if "remat_policy" in values:
            values["remat_policy"] = values["remat_policy"] or None
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
