"""The Pallas attention kernels (vpd_jax.models.kernels), run in the Pallas interpreter on the CPU: values and
gradients equal our core's (vpd_jax.models.attention) for the self- and cross-attention shapes of SD1.5 and SD2;
they lower for TPUs, initialise what they accumulate, and run per device under a mesh."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from tests.models.test_attention import nested_equations
from vpd_jax import parallel
from vpd_jax.models.attention import multi_head_attention
from vpd_jax.models.compute import PallasOptions
from vpd_jax.models.kernels.map_attention import map_attention
from vpd_jax.models.kernels.tpu_attention import tpu_attention

CONTEXT = 77  # CLIP's text tokens: the keys of SD's cross-attention


def _inputs(q_len, kv_len, heads, head_dim, seed=0, batch=1):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, n, heads * head_dim)).astype(np.float32) for n in (q_len, kv_len, kv_len))
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_map = 10 * rng.standard_normal((batch, q_len, kv_len)).astype(np.float32)  # maps are small: weigh them up
    return (q, k, v), (d_out, d_map)


@functools.partial(jax.jit, static_argnames=("heads", "kernel", "maps", "options"))
def _values_and_gradients(q, k, v, d_out, d_map, *, heads, kernel, maps, options):
    """(output, map or None) and the gradients of <output, d_out> (+ <map, d_map>) with respect to q, k, v, where
    `kernel` attends (recording the map if `maps`)."""
    def attend(q, k, v):
        if maps:
            return multi_head_attention(q, k, v, heads, return_probs=True, map_implementation=kernel, pallas=options)
        return multi_head_attention(q, k, v, heads, implementation=kernel, pallas=options)[0], None

    (out, probs), vjp = jax.vjp(attend, q, k, v)
    return (out, probs), vjp((d_out, d_map if maps else None))


def _assert_close(got, want, what):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                               err_msg=what)


def _check_against_core(kernel, q_len, kv_len, heads, head_dim, options):
    """The kernel's values and gradients are our core's within 1e-5 relative (to each array's largest value)."""
    (q, k, v), (d_out, d_map) = _inputs(q_len, kv_len, heads, head_dim)
    run = functools.partial(_values_and_gradients, q, k, v, d_out, d_map, heads=heads, maps=kernel == "pallas",
                            options=options)
    (out, probs), grads = run(kernel=kernel)
    (ref_out, ref_probs), ref_grads = run(kernel="xla")
    _assert_close(out, ref_out, "output")
    if kernel == "pallas":
        assert probs.shape == ref_probs.shape and probs.dtype == jnp.float32
        _assert_close(probs, ref_probs, "map")
    for name, g, ref in zip("qkv", grads, ref_grads):
        _assert_close(g, ref, f"d{name}")


INTERPRETED = PallasOptions(block_q=128, block_kv=128, interpret=True)  # small tiles: several per sequence


# (kernel, queries, keys, heads, head width): tiles of 128, so each has sequences of several tiles, padded
# sequences (77 keys, 200 queries) and head widths padded to 128 and to 256.
FAST_CASES = [
    ("splash", 256, 256, 2, 40),
    ("splash", 200, CONTEXT, 2, 64),
    ("flash", 256, 256, 1, 160),
    ("flash", 200, CONTEXT, 2, 80),
    ("pallas", 256, CONTEXT, 3, 80),
    ("pallas", 200, 200, 2, 40),
]


@pytest.mark.parametrize("kernel, q_len, kv_len, heads, head_dim", FAST_CASES)
def test_kernels_match_our_core_in_values_and_gradients(kernel, q_len, kv_len, heads, head_dim):
    _check_against_core(kernel, q_len, kv_len, heads, head_dim, INTERPRETED)


@pytest.mark.parametrize("kernel", ["splash", "flash", "pallas"])
def test_kernels_take_bfloat16_as_our_core_does(kernel):
    """bfloat16 q, k, v (compute.dtype='bfloat16'): output and gradients in bfloat16, the map in float32, all
    within bfloat16 rounding of our core's."""
    (q, k, v), (d_out, d_map) = _inputs(200, CONTEXT, 2, 64)
    q, k, v, d_out = (jnp.asarray(t, jnp.bfloat16) for t in (q, k, v, d_out))
    run = functools.partial(_values_and_gradients, q, k, v, d_out, d_map, heads=2, maps=kernel == "pallas",
                            options=INTERPRETED)
    (out, probs), grads = run(kernel=kernel)
    (ref_out, ref_probs), ref_grads = run(kernel="xla")
    for name, got, want in (("output", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert got.dtype == jnp.bfloat16, name
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02 * np.abs(want).max(), err_msg=name)
    if kernel == "pallas":
        assert probs.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(probs), np.asarray(ref_probs), atol=1e-3)


def _sd_shapes():
    """(name, queries, head width, heads) of every UNet level of SD1.5 (8 heads of 40/80/160/160) and SD2 (heads
    of 64: 5/10/20/20) at 256 and 512 px (latents of 32x32 and 64x64), each once."""
    seen, shapes = set(), []
    for arch, widths, heads in (("sd15", (40, 80, 160, 160), (8, 8, 8, 8)), ("sd2", (64,) * 4, (5, 10, 20, 20))):
        for px in (256, 512):
            for level, (width, count) in enumerate(zip(widths, heads)):
                tokens = (px // 8 // 2 ** level) ** 2
                if (tokens, width) not in seen:
                    seen.add((tokens, width))
                    shapes.append((f"{arch}-{px}px-level{level}", tokens, width, count))
    return shapes


def _sd_cases():
    """Self- and cross-attention of each SD shape for each kernel. The TPU kernels treat heads independently: one
    head each; the map kernel averages them: two."""
    cases = []
    for name, tokens, width, heads in _sd_shapes():
        for attention, kv_len in (("self", tokens), ("cross", CONTEXT)):
            for kernel in ("splash", "flash", "pallas"):
                cases.append(pytest.param(kernel, tokens, kv_len, min(heads, 2 if kernel == "pallas" else 1), width,
                                          id=f"{kernel}-{name}-{attention}-{tokens}x{kv_len}x{width}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("kernel, q_len, kv_len, heads, head_dim", _sd_cases())
def test_kernels_match_our_core_at_the_shapes_of_sd15_and_sd2(kernel, q_len, kv_len, heads, head_dim):
    _check_against_core(kernel, q_len, kv_len, heads, head_dim, PallasOptions(interpret=True))  # default tiles


def test_map_kernel_initialises_what_it_accumulates_and_has_no_races():
    """In the TPU interpreter, which fills fresh memory with NaN and looks for races between grid steps, the map
    kernel's output, map and gradients (accumulated over heads and over query tiles) are finite and correct."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
    with pltpu.force_tpu_interpret_mode(params):
        _check_against_core("pallas", 256, CONTEXT, 2, 40, INTERPRETED)
    assert not interpret_pallas_call.races.races_found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_tpus(dtype):
    """Exported for a TPU from this CPU: Pallas lowers each kernel, forward and backward, to Mosaic (block shapes,
    layouts and operations it accepts) at SD's largest self-attention and a cross-attention with head width 160."""
    def loss(kernel, q, k, v):
        if kernel == "pallas":
            out, probs = map_attention(q, k, v, scale=0.1, options=PallasOptions())
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(probs)
        return jnp.sum(tpu_attention(q, k, v, kernel=kernel, scale=0.1, options=PallasOptions()).astype(jnp.float32))

    for q_len, kv_len, width in ((4096, 4096, 40), (1024, CONTEXT, 160)):
        q = jax.ShapeDtypeStruct((2, 8, q_len, width), dtype)
        kv = jax.ShapeDtypeStruct((2, 8, kv_len, width), dtype)
        for kernel in ("splash", "flash", "pallas"):
            step = jax.jit(jax.value_and_grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))
            module = jax.export.export(step, platforms=["tpu"])(q, kv, kv).mlir_module()
            calls = module.count("tpu_custom_call")
            assert calls == (2 if kernel == "pallas" else 3), (kernel, q_len, calls)  # forward + backward kernels


def test_kernels_run_on_each_devices_shard_under_a_mesh():
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernels run inside shard_map (batch over data x fsdp; heads over
    tensor where nothing is averaged over them) and give the unsharded results."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    heads = 2
    (q, k, v), (d_out, d_map) = _inputs(128, CONTEXT, heads, 40, batch=4)

    def both(q, k, v):
        out, _ = multi_head_attention(q, k, v, heads, implementation="splash", pallas=INTERPRETED)
        mapped, probs = multi_head_attention(q, k, v, heads, return_probs=True, map_implementation="pallas",
                                             pallas=INTERPRETED)
        return jnp.sum(out * d_out) + jnp.sum(mapped * d_out) + jnp.sum(probs * d_map)

    grad = jax.jit(jax.value_and_grad(both, argnums=(0, 1, 2)))
    expected = grad(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        jaxpr = jax.make_jaxpr(grad)(q, k, v)
        got = grad(q, k, v)
    batch = ("data", "fsdp")  # splash: (B, H, ...) over batch and heads; the map kernel: over the batch only
    in_specs = {spec for eqn in nested_equations(jaxpr.jaxpr) if eqn.primitive.name == "shard_map"
                for spec in eqn.params["in_specs"]}
    assert {P(batch, "tensor"), P(batch, None)} <= in_specs
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
    for name, g, e in zip("qkv", got[1], expected[1]):
        _assert_close(g, e, f"d{name}")
