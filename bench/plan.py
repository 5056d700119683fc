"""What `python -m bench.run` measures in each mode, as the specs its workers get (bench/worker.py).

  default  SD1.5-size: cases.default_cases() for the backbone, the compile-only cost of the 512 px programs and
           the memory of the VPD-seg train step (_one_factor_variants), the input pipelines on 48 full-size
           images. The 1-device rows are compiled at per-device batches 1, 4 and 8: at batch 1 the step's peak
           is the optimizer update, whatever the remat or query chunk, so the per-example line needs two larger
           batches (with query chunks even batch 2 stays under the update's peak). Each train step takes XLA:CPU
           1-4 minutes to compile on one thread (mostly code generation for its ~11,000 kernels), two at a
           time; so the meshes are compiled at per-device batch 1 only and take their per-example slope from
           the 1-device row (the per-device activations do not depend on how the parameters are sharded: the
           2026-12-02 run, which compiled every mesh at two batches, found 6.85 GiB per example on 1 device, on
           fsdp=8 and on data=2 x fsdp=4 alike).
           BENCHMARKS.md's part headers say how long each part took.
  full     the same with cases.full_cases(), every remat x dtype x mesh x query chunk combination at batches 1, 4 and 8
           and the 'updates' non-finite check
  quick    the tiny UNet (cases.tiny_cases(), 64 px), the compiled cost of the forward programs, a few input
           batches: checks the harness end to end in minutes (tests/test_bench.py). No VPD-seg train step is
           compiled (no memory section): at tiny size it still takes XLA:CPU 1.5-3 minutes per compile. JAX
           compiles with the fast-compile flags, so its times, like everything timed in a quick run, mean nothing.

The backbone part is planned per case: one JAX and one PyTorch worker per case, with identical specs.
"""
from __future__ import annotations

import dataclasses
import itertools

from bench import cases as cases_lib
from bench.compiled_jobs import variant
from bench.worker import FAST_COMPILE_XLA_FLAGS

CAPACITIES_GIB = (16.0, 80.0)  # TPU v5e, H100
PER_BLOCK_REMAT = "nothing_saveable"
# The memory table's compute.attention_query_chunk is the backbone cases' (cases.QUERY_CHUNK). It is not in the
# cost section: XLA's cost analysis counts the body of the chunks' scan once.
QUERY_CHUNK = cases_lib.QUERY_CHUNK
ONE_DEVICE, FSDP8, DATA2_FSDP4 = {}, {"fsdp": 8}, {"data": 2, "fsdp": 4}
# Per-device batches of the memory table: batch 1 shows the update's peak, 4 and 8 the activations' line.
MEMORY_BATCHES = (1, 4, 8)


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str
    unet: dict  # diffusers UNet config of the backbone comparison
    cases: list[cases_lib.Case]
    jax_xla_flags: str  # added to XLA_FLAGS of the timed JAX workers
    compiled: dict  # spec of the compile-only jobs (bench/compiled_jobs.py)
    input: dict  # spec of bench/input_pipeline.py
    compile_parallel: int = 2  # compile-only worker processes at a time (at most one per core; ~6 GiB RSS each)


def _one_factor_variants() -> list[dict]:
    """From 1 device / fp32 / no remat / the configs' defaults, one factor changed at a time (and the two memory
    savers together)."""
    return [variant(), variant(remat=PER_BLOCK_REMAT), variant(dtype="bfloat16"),
            variant(attention_query_chunk=QUERY_CHUNK),
            variant(remat=PER_BLOCK_REMAT, attention_query_chunk=QUERY_CHUNK), variant(FSDP8), variant(DATA2_FSDP4)]


def _all_variants() -> list[dict]:
    return [variant(mesh, dtype, remat, attention_query_chunk=chunk) for mesh, dtype, remat, chunk in
            itertools.product((ONE_DEVICE, FSDP8, DATA2_FSDP4), ("float32", "bfloat16"), (None, PER_BLOCK_REMAT),
                              (0, QUERY_CHUNK))] + [variant(nonfinite_check="updates")]


def _compiled(arch: str, image: int, train_remats: list, variants: list[dict],
              mesh_per_device_batches: list[int] | None = None) -> dict:
    spec: dict = dict(cost=dict(arch=arch, image=image, batch=1, train_remats=train_remats))
    if variants:
        spec["memory"] = dict(arch=arch, image=image, variants=variants, per_device_batches=list(MEMORY_BATCHES),
                              capacities_gib=list(CAPACITIES_GIB))
        if mesh_per_device_batches:
            spec["memory"]["mesh_per_device_batches"] = mesh_per_device_batches
    return spec


def make_plan(mode: str) -> Plan:
    if mode == "quick":
        return Plan(mode, cases_lib.TINY_UNET, cases_lib.tiny_cases(), FAST_COMPILE_XLA_FLAGS,
                    _compiled("tiny", 64, [], []),
                    dict(images=4, batches=2, batch_size=2))
    sd15 = dict(unet=cases_lib.SD15_UNET, jax_xla_flags="", input=dict(images=48, batches=12, batch_size=8))
    if mode == "default":
        return Plan(mode, cases=cases_lib.default_cases(),
                    compiled=_compiled("sd15", 512, [None, PER_BLOCK_REMAT], _one_factor_variants(), [1]), **sd15)
    if mode == "full":
        return Plan(mode, cases=cases_lib.full_cases(),
                    compiled=_compiled("sd15", 512, [None, PER_BLOCK_REMAT], _all_variants()), **sd15)
    raise ValueError(f"unknown mode {mode!r}")


def readouts(unet: dict, images: set[int]) -> dict[str, dict]:
    """VPD's taps and attention layers (vpd_jax.models.vpd.feature_spec) per input size, for both workers.
    Imports JAX but starts no backend: the orchestrating process holds no device and no framework memory."""
    from vpd_jax.models.unet_config import UNetConfig
    from vpd_jax.models.vpd import feature_spec

    config = UNetConfig.from_dict(unet)
    out = {}
    for image in sorted(images):
        spec = feature_spec(config, (image, image), True)
        out[str(image)] = dict(taps=list(spec.taps), attn_layers=list(spec.attn_layers))
    return out


def backbone_spec(plan: Plan, case: cases_lib.Case, device: str, threads: int) -> dict:
    """The spec of one case, the same for the JAX and the PyTorch worker (the JAX one also gets its XLA flags)."""
    return dict(device=device, threads=threads, unet=plan.unet, cases=[dataclasses.asdict(case)],
                readouts=readouts(plan.unet, {case.image}))
