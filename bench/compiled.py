"""Compile-only jobs (bench/compiled_jobs.py): nothing runs and no parameter is allocated (all inputs are
ShapeDtypeStructs).

* `programs` (issue item 2): FLOPs from XLA's cost analysis of the compiled forward programs (UNet read-outs,
  VPDSeg forward) next to the analytic count of bench/flops.py, and the analytic counts of the train steps.
* `train_step` (items 2 and 3): the real VPD-seg train step (`Trainer.train_step`, as train.py jits it: donated
  state, sharded in and out) of one dtype x remat x mesh x global batch: its XLA FLOPs and per-device memory.

The worker runs with 8 fake CPU devices and XLA:CPU's fast-compile flags (backend optimisation level 0, no
fusion emitters): they change code generation, not the HLO passes, fusion decisions or buffer assignment the
numbers come from. Its concurrency-optimised scheduler is off (bench/worker.py: COMPILE_ONLY_XLA_FLAGS), which
does change the buffer assignment, to a CPU-independent order. On a TPU or GPU the buffer assignment differs
somewhat; these are XLA:CPU's numbers.
"""
from __future__ import annotations

import importlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench import compiled_jobs, flops, machine
from bench.backbone_jax import memory_analysis
from vpd_jax.models import convolution
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.vpd import feature_spec
from vpd_jax.run.setup import setup
from vpd_jax.weights.convert import abstract_params

CONTEXT_TOKENS = 150


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)))


def _compile(fn, *args, label: str = "") -> tuple[object, float]:
    start = time.perf_counter()
    # Traced with the accelerators' convolution: compute.conv 'auto' takes im2col matrix products on XLA:CPU
    # outside a mesh, which the TPU / GPU programs these numbers stand for never run (and XLA counts their
    # zero-padded border products as FLOPs, a convolution's cost analysis does not).
    with convolution.implementation_context("xla"):
        compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    print(f"[bench.compiled] {label or getattr(fn, '__name__', 'program')}: compiled in {seconds:.1f} s",
          file=sys.stderr, flush=True)
    return compiled, seconds


def _sds(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


# ------------------------------------------------------------------------------- the VPD-seg train step


def seg_config(key: dict):
    """configs/vpd_seg_ade20k.py (the paper run) as a compiled_jobs.step_key says (architecture preset, crop size,
    variant), with random class embeddings: no files."""
    config = importlib.import_module("configs.vpd_seg_ade20k").get_config()
    config.model.arch = key["arch"]
    config.model.class_embeddings = "random"
    config.compute.dtype = key["dtype"]
    config.compute.remat_policy = key["remat"] or ""
    config.compute.attention_query_chunk = key["attention_query_chunk"]
    config.compute.conv = "xla"  # the accelerators' convolution (see _compile)
    config.nonfinite_check = key["nonfinite_check"]
    config.data.aug.crop_size = (key["image"], key["image"])
    mesh = key["mesh"]
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), 1
    return config


class SegTrainStep:
    """The real jitted train step of a seg config on a mesh of the first data x fsdp devices, compiled for a
    given global batch from abstract state."""

    def __init__(self, config):
        self.devices = config.mesh.data * config.mesh.fsdp
        run = setup(config, devices=jax.devices()[: self.devices])
        self.mesh, self.task, self.trainer = run.mesh, run.task, run.trainer

    def compile(self, global_batch: int) -> tuple[object, float]:
        t = self.trainer
        batch = {k: _sds((global_batch, *v.shape[1:]), v.dtype, t.batch_sharding)
                 for k, v in self.task.example_batch().items()}
        constants = {k: _sds(v.shape, v.dtype, t.replicated) for k, v in self.task.constants.items()}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(t.rules):
            return _compile(t.jit_train_step(), t.abstract_state, batch, constants,
                            label=f"train step, {self.devices} device(s), global batch {global_batch}")


# --------------------------------------------------------------------------------------- forward programs


def _unet_programs(config, image: int, batch: int):
    """(key, name, jitted fn, args, analytic ops) of the UNet read-outs compared in the report."""
    unet = UNet2DConditionModel(config)
    spec = feature_spec(config, (image, image), True)
    _, all_maps = config.module_names()
    latent = (image // 8, image // 8)
    args = (abstract_params(unet), _sds((batch, *latent, 4), jnp.float32),
            _sds((batch, CONTEXT_TOKENS, config.cross_attention_dim), jnp.float32))

    def readout(taps, maps, output_sample=False, keep_sample=False):
        def fn(params, x, context):
            out = unet.apply({"params": params}, x, jnp.ones((x.shape[0],), jnp.int32), context, taps=taps,
                             attn_maps=maps, output_sample=output_sample)
            return out.sample if keep_sample else (out.taps, out.attn)
        return jax.jit(fn)

    vpd_ops = flops.unet_ops(config, latent, batch, CONTEXT_TOKENS, taps=spec.taps)
    full_ops = flops.unet_ops(config, latent, batch, CONTEXT_TOKENS)
    return [
        ("full", "UNet, full noise prediction (conv_out), no taps", readout((), (), True, True), args, full_ops),
        ("backbone", f"UNet, VPD taps + {len(spec.attn_layers)} VPD maps (the backbone)",
         readout(spec.taps, spec.attn_layers), args, vpd_ops),
        ("no_maps", "UNet, VPD taps, no maps", readout(spec.taps, ()), args, vpd_ops),
        ("all_maps", f"UNet, VPD taps + all {len(all_maps)} attention maps", readout(spec.taps, tuple(all_maps)),
         args, vpd_ops),
        ("unused_tail", "UNet, VPD taps + maps, full output computed but unused",
         readout(spec.taps, spec.attn_layers, True), args, vpd_ops),
    ]


def _seg_forward_program(step: SegTrainStep, image: int, batch: int):
    model = step.task.model
    images = _sds((batch, image, image, 3), jnp.float32)
    classes = step.task.constants["class_embeddings"]
    # Shapes enter eval_shape / jit as arguments: a ShapeDtypeStruct closed over is not traced.
    variables = nn.meta.unbox(jax.eval_shape(lambda x, c: model.init(jax.random.key(0), x, c, train=False),
                                             images, classes))
    fn = jax.jit(lambda v, x, c: model.apply(v, x, c, train=False))
    return fn, (variables, images, _sds(classes.shape, classes.dtype))


def run_programs(spec: dict) -> dict:
    """spec: arch, image, batch, train_remats. The forward programs' rows, the analytic FLOPs of the train step
    for each remat policy in train_remats ('none' for None) and of the VAE decoder VPD deletes."""
    arch, image, batch = spec["arch"], spec["image"], spec["batch"]
    rows = []

    def add(key, name, compiled, seconds, analytic):
        rows.append(dict(key=key, name=name, compile_s=seconds, analytic_flops=analytic, note="",
                         **_cost(compiled), xla_memory=memory_analysis(compiled)))

    config = seg_config(compiled_jobs.step_key(arch, image, compiled_jobs.variant(), batch))
    step = SegTrainStep(config)
    arch_cfg = step.task.arch
    for key, name, fn, args, ops in _unet_programs(arch_cfg.unet, image, batch):
        add(key, name, *_compile(fn, *args, label=name), flops.forward_flops(ops))
    seg_spec = feature_spec(arch_cfg.unet, (image, image), True)
    seg_ops = flops.vpd_seg_ops(arch_cfg.unet, arch_cfg.vae, (image, image), batch, config.model.num_classes,
                                seg_spec.taps, fpn_channels=config.model.fpn_channels)
    name = "VPDSeg forward (VAE encoder, adapter, UNet to the taps, FPN)"
    fn, args = _seg_forward_program(step, image, batch)
    add("seg_forward", name, *_compile(fn, *args, label=name), flops.forward_flops(seg_ops))
    train = {remat or "none": flops.train_flops(seg_ops, flops.unet_block_prefixes() if remat else ())
             for remat in spec["train_remats"]}
    decoder = flops.forward_flops(flops.vae_decoder_ops(arch_cfg.vae, (image, image), batch))
    return dict(programs=rows, train_analytic_flops=train, decoder_flops=decoder)


def compile_train_step(key: dict) -> dict:
    """key: compiled_jobs.step_key. XLA's cost and per-device memory of that train step, and its compile time."""
    config = seg_config(key)
    compiled, seconds = SegTrainStep(config).compile(key["global_batch"])
    return dict(compile_s=seconds, **_cost(compiled), xla_memory=memory_analysis(compiled))


def run(spec: dict) -> dict:
    """One job of compiled_jobs.jobs(): {'job': 'programs', 'cost': ...} or {'job': 'train_step', 'key': ...}."""
    if spec["job"] == "programs":
        result = run_programs(spec["cost"])
    elif spec["job"] == "train_step":
        result = compile_train_step(spec["key"])
    else:
        raise ValueError(f"unknown compiled job {spec['job']!r}")
    return dict(result, peak_rss_bytes=machine.peak_rss_bytes())
