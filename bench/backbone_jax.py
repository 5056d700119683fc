"""The JAX side of the backbone comparison: our Flax UNet doing VPD's work (bench/cases.py).

The four taps and ten maps come from `UNet2DConditionModel.apply(..., taps, attn_maps, output_sample=False)` and
are assembled by `vpd_jax.models.vpd.assemble_features` (maps without gradient), exactly as VPDSeg does. The
train step is jitted with the parameters and optimizer state donated (PyTorch updates in place). Lowering and
compilation are timed separately from the runs, and XLA's compiled memory analysis is kept. Runs in its own
process (bench/worker.py); imports no PyTorch.
"""
from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from bench import cases as cases_lib
from bench import machine, timing
from bench.weights import random_weight
from vpd_jax.models.compute import DTYPES, Compute
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vpd import FeatureSpec, assemble_features
from vpd_jax.weights import convert_state_dict
from vpd_jax.weights.convert import _torch_layout_shape, torch_key_of

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def readout_param_shapes(model: UNet2DConditionModel) -> dict:
    """The parameters of the VPD read-out: init stops after the last up block (`output_sample=False`), so the
    output head (conv_norm_out, conv_out), which VPD never applies (docs/reference.md, "VPD backbone") and the
    PyTorch side deletes, gets none. Both frameworks then hold, differentiate and update the same parameters."""
    last = f"up_blocks.{len(model.config.up_block_types) - 1}"
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(), taps=(last,),
                                                  output_sample=False))
    return nn.meta.unbox(variables)["params"]


def bench_params(model: UNet2DConditionModel, device: jax.Device) -> dict:
    """The bench's deterministic weights (bench/weights.py), converted leaf by leaf from their PyTorch names with
    the project's strict converter and placed on `device` (never a second full copy on the host)."""
    flat = {}
    for path, leaf in flatten_dict(readout_param_shapes(model)).items():
        key = torch_key_of(path)
        value = random_weight(key, _torch_layout_shape(path[-1], tuple(leaf.shape)))
        converted = convert_state_dict({key: value}, unflatten_dict({path: leaf}), source="bench weights")
        flat[path] = jax.device_put(flatten_dict(converted)[path], device)
    return unflatten_dict(flat)


def bench_adamw() -> optax.GradientTransformation:
    """The optimizer of bench's train cases (bench/cases.py ADAMW), as optax builds it."""
    a = cases_lib.ADAMW
    return optax.adamw(a["lr"], b1=a["b1"], b2=a["b2"], eps=a["eps"], weight_decay=a["weight_decay"])


def memory_analysis(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {} if stats is None else {f: int(getattr(stats, f)) for f in MEMORY_FIELDS if hasattr(stats, f)}


class Backbone:
    """Jitted forward and train step of the VPD read-out for one read-out spec and dtype."""

    def __init__(self, config: UNetConfig, taps: tuple[str, ...], maps: tuple[str, ...], dtype: str,
                 query_chunk: int = 0, conv: str = "auto"):
        self.compute = compute = Compute(dtype=DTYPES[dtype], attention_query_chunk=query_chunk, conv=conv)
        self.model = UNet2DConditionModel(config, compute=compute)
        self.spec = FeatureSpec(tuple(taps), tuple(maps))

    def features(self, params, latent, context) -> list[jax.Array]:
        timesteps = jnp.full((latent.shape[0],), cases_lib.TIMESTEP, jnp.int32)
        with self.compute.trace_scope():
            out = self.model.apply({"params": params}, latent, timesteps, context, taps=self.spec.taps,
                                   attn_maps=self.spec.attn_layers, output_sample=False)
        return assemble_features(out.taps, out.attn, self.spec, stop_grad_attn=True)

    def train_step(self, tx: optax.GradientTransformation):
        def step(params, opt_state, latent, context):
            def loss_fn(p):
                return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in self.features(p, latent, context))

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1))


def _compile(jitted, *args) -> tuple[object, dict]:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, dict(lower_s=lowered_at - start, compile_s=done - lowered_at, xla_memory=memory_analysis(compiled))


def _device(kind: str) -> jax.Device:
    """'cpu', or 'accelerator': JAX's default backend, which must then be a GPU or TPU."""
    device = jax.devices("cpu" if kind == "cpu" else None)[0]
    if kind == "accelerator" and device.platform == "cpu":
        raise RuntimeError("no accelerator: JAX's default backend is the CPU")
    return device


def run(spec: dict) -> dict:
    """Measure every case of `spec` (keys: device, unet, cases, readouts; see bench/worker.py and bench/plan.py);
    returns the JSON-able results."""
    device = _device(spec["device"])
    config = UNetConfig.from_dict(spec["unet"])
    start = time.perf_counter()
    params = bench_params(UNet2DConditionModel(config), device)
    result = dict(framework="jax", setup_s=time.perf_counter() - start, device=str(device),
                  threads=len(machine.available_cpus()),  # XLA:CPU sizes its thread pool from the affinity mask
                  parameters=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
                  rss_after_setup_bytes=machine.rss_bytes(), cases=[])
    tx = bench_adamw()
    state: dict = {"params": params}
    for case in cases_lib.ordered([cases_lib.Case(**c) for c in spec["cases"]]):
        try:
            readout = spec["readouts"][str(case.image)]
            backbone = Backbone(config, readout["taps"], readout["attn_layers"], case.dtype, case.query_chunk,
                                case.conv)
            latent, context = (jax.device_put(a, device) for a in cases_lib.inputs(case, config.cross_attention_dim))
            if case.mode == "forward":
                compiled, compile_info = _compile(jax.jit(backbone.features), state["params"], latent, context)

                def step():
                    jax.block_until_ready(compiled(state["params"], latent, context))
            else:
                if "opt_state" not in state:
                    state["opt_state"] = jax.jit(tx.init)(state["params"])
                compiled, compile_info = _compile(backbone.train_step(tx), state["params"], state["opt_state"],
                                                  latent, context)
                losses = []

                def step():
                    new = compiled(state["params"], state["opt_state"], latent, context)
                    state["params"], state["opt_state"], loss = jax.block_until_ready(new)
                    losses.append(float(loss))
            row = dict(name=case.name, case=dataclasses.asdict(case), **compile_info,
                       **timing.run_case(step, case.warmup, case.reps))
            if device.platform != "cpu":
                row["device_peak_bytes"] = int(device.memory_stats().get("peak_bytes_in_use", 0))
            if case.mode == "forward":
                row["digest"] = cases_lib.digest([np.asarray(f.astype(jnp.float32))
                                                  for f in compiled(state["params"], latent, context)])
            else:
                row["first_loss"] = losses[0]
            result["cases"].append(row)
        except Exception as err:  # one failing case (e.g. out of memory on a GPU) must not lose the others
            result["cases"].append(dict(name=case.name, case=dataclasses.asdict(case),
                                        error=f"{type(err).__name__}: {err}"))
    return result
