"""The Flax SD UNet: parity with diffusers (output, every tap, attention maps), taps API, cost, remat, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.unet_reference import TINY_CONFIGS, make_tiny_unet, rel_err, run_with_taps
from vpd_jax import parallel
from vpd_jax.models.compute import Compute
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.weights import load_unet

TOL = 1e-4  # max |ours - reference| <= TOL * max |reference|, float32

# (config, spatial size, batch, timesteps, compute.conv): odd sizes exercise diffusers' upsample-to-skip-size
# path; 'auto' keeps XLA's convolution for the tiny UNets' few channels (but for 1x1), 'matmul' takes the matrix
# form for every conv.
PARITY_CASES = [
    ("sd1", 16, 2, [1, 981], "auto"),
    ("sd2", 18, 2, [0, 500], "auto"),
    ("sd1_uneven", 13, 3, [7, 250, 999], "auto"),
    ("sd1_uneven", 13, 3, [7, 250, 999], "matmul"),
]


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
    folders = {}
    for name in TINY_CONFIGS:
        folder = tmp_path_factory.mktemp(name)
        make_tiny_unet(name).save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
    return folders


def _inputs(config: UNetConfig, size: int, batch: int, timesteps, n_ctx: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, size, size, config.in_channels)).astype(np.float32),
            np.asarray(timesteps, np.int64),
            rng.standard_normal((batch, n_ctx, config.cross_attention_dim)).astype(np.float32))


@pytest.mark.parametrize("name, size, batch, timesteps, conv", PARITY_CASES)
def test_parity_with_diffusers_sample_every_tap_and_every_attention_map(saved_unets, name, size, batch, timesteps,
                                                                         conv):
    from diffusers import UNet2DConditionModel as TorchUNet

    unet, params = load_unet(saved_unets[name])
    taps, maps = unet.config.module_names()
    sample, t, context = _inputs(unet.config, size, batch, timesteps)
    ref_sample, ref_taps, ref_maps = run_with_taps(
        TorchUNet.from_pretrained(saved_unets[name]).eval(), sample, t, context, taps, maps)

    with Compute(conv=conv).trace_scope():
        out = _apply(unet, taps=tuple(taps), attn_maps=tuple(maps))(params, sample, t, context)
    assert out.sample.shape == ref_sample.shape
    assert rel_err(out.sample, ref_sample) <= TOL
    for tap in taps:
        ours = np.asarray(out.taps[tap])
        ref = ref_taps[tap]
        if ref.ndim == 3:  # transformer-block tokens (B, h*w, C), row-major over (h, w)
            ref = ref.reshape(ours.shape)
        assert rel_err(ours, ref) <= TOL, tap
    for m in maps:
        ours = np.asarray(out.attn[m])
        b, h, w, n = ours.shape
        assert ref_maps[m].shape == (b, h * w, n)
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
        assert rel_err(ours, ref_maps[m].reshape(ours.shape)) <= TOL, m


@pytest.fixture(scope="module")
def tiny(saved_unets):
    """The 2-block SD1-style UNet, loaded (no init compile), with a batch of 2 inputs."""
    unet, params = load_unet(saved_unets["sd1"])
    sample, t, context = _inputs(unet.config, 16, 2, [3, 400])
    return unet, params, (jnp.asarray(sample), jnp.asarray(t), jnp.asarray(context))


def _apply(unet, **kwargs):
    """A jitted forward (one compile instead of op-by-op dispatch)."""
    return jax.jit(lambda params, *args: unet.apply({"params": params}, *args, **kwargs))


def test_unknown_names_raise_listing_valid_ones(tiny):
    unet, params, args = tiny
    with pytest.raises(ValueError, match="up_blocks.7.resnets.0") as err:
        unet.apply({"params": params}, *args, taps=("up_blocks.7.resnets.0",))
    assert "up_blocks.1.attentions.1" in str(err.value)  # the valid names are listed
    with pytest.raises(ValueError, match="attention-map") as err:
        unet.apply({"params": params}, *args, attn_maps=("up_blocks.1.attentions.0",))
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2" in str(err.value)


def test_requested_maps_do_not_change_the_output(tiny):
    """Layers without requested maps take the fused path; both paths must agree."""
    unet, params, args = tiny
    _, maps = unet.config.module_names()
    plain = _apply(unet)(params, *args)
    with_maps = _apply(unet, attn_maps=tuple(maps))(params, *args)
    assert plain.attn == {} and plain.taps == {}
    np.testing.assert_allclose(plain.sample, with_maps.sample, rtol=1e-5, atol=1e-5)


def _count_convs(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def test_output_sample_false_stops_after_the_last_requested_tap(tiny):
    unet, params, args = tiny
    tap = "up_blocks.0.resnets.1"
    full = _apply(unet, taps=(tap,))(params, *args)
    early = _apply(unet, taps=(tap,), output_sample=False)(params, *args)
    assert early.sample is None
    np.testing.assert_array_equal(early.taps[tap], full.taps[tap])
    convs_full = _count_convs(lambda p: unet.apply({"params": p}, *args, taps=(tap,)), params)
    convs_early = _count_convs(lambda p: unet.apply({"params": p}, *args, taps=(tap,), output_sample=False), params)
    assert convs_early < convs_full


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_xla_drops_the_unused_tail_under_jit(tiny):
    unet, params, args = tiny
    tap = "down_blocks.0.attentions.0"
    flops_sample = _flops(lambda p: unet.apply({"params": p}, *args, taps=(tap,)).sample, params)
    flops_tap = _flops(lambda p: unet.apply({"params": p}, *args, taps=(tap,)).taps[tap], params)
    flops_early = _flops(lambda p: unet.apply({"params": p}, *args, taps=(tap,), output_sample=False).taps[tap], params)
    # The tap sits in the first of two down blocks: most of the network (mid block, decoder) is not needed.
    assert flops_tap < 0.5 * flops_sample
    assert flops_tap == pytest.approx(flops_early, rel=0.02)


def test_remat_gives_the_same_values_and_gradients(tiny):
    unet, params, args = tiny
    remat_unet = unet.clone(compute=Compute(remat_policy="nothing_saveable"))

    def loss(model, p):
        out = model.apply({"params": p}, *args, taps=("up_blocks.1.attentions.1",))
        return jnp.sum(out.sample ** 2) + jnp.sum(out.taps["up_blocks.1.attentions.1"])

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(unet, p)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(remat_unet, p)))(params)
    np.testing.assert_allclose(value, value_r, rtol=1e-5)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        assert rel_err(g_r, g) <= 1e-5
    with pytest.raises(ValueError, match="unknown remat policy"):
        unet.clone(compute=Compute(remat_policy="sometimes")).apply({"params": params}, *args)


def test_bfloat16_compute_keeps_float32_params_and_stays_close(tiny):
    unet, params, args = tiny
    bf16 = unet.clone(compute=Compute(dtype=jnp.bfloat16))
    boxed = jax.eval_shape(bf16.init, jax.random.key(0), *bf16.dummy_inputs())["params"]
    assert {leaf.value.dtype for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))} \
        == {jnp.dtype(jnp.float32)}
    ref = _apply(unet)(params, *args).sample
    out = _apply(bf16)(params, *args).sample
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.astype(jnp.float32)), np.asarray(ref)) < 0.05


def test_every_parameter_has_logical_axes(tiny):
    unet, _, _ = tiny
    boxed = jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_sharded_initialisation_and_forward_match_unsharded(tiny):
    unet, _, args = tiny
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    init = lambda rng: unet.init(rng, *unet.dummy_inputs())  # noqa: E731
    variables, _ = parallel.init_sharded(init, mesh, jax.random.key(0))

    # Created distributed over the mesh: fsdp on the input features, tensor on the output features.
    kernel = variables["params"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4
    conv_in = variables["params"]["conv_in"]["kernel"]
    assert conv_in.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")

    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = [jnp.concatenate([a, a]) for a in args]

    @jax.jit
    def forward(variables, sample, t, context):
        with parallel.logical_rules_context():
            out = unet.apply(variables, sample, t, context, taps=("mid_block",))
        return out.sample, out.taps["mid_block"]

    with jax.set_mesh(mesh):
        sharded_sample, sharded_tap = forward(variables, *(jax.device_put(a, batch_sharding) for a in batch))
    assert sharded_sample.sharding.spec[0] == ("data", "fsdp")
    plain = _apply(unet, taps=("mid_block",))(jax.device_get(variables["params"]), *batch)
    np.testing.assert_allclose(sharded_sample, plain.sample, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded_tap, plain.taps["mid_block"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk, remat", [(64, None), (96, None), (96, "nothing_saveable")])
def test_attention_query_chunks_give_the_same_values_and_gradients(tiny, chunk, remat):
    """The tiny UNet at 16x16 has 256 queries in its first attention layers: 4 chunks of 64, or 3 of 96 with
    the last one padded; maps recorded at some layers (those stay unchunked)."""
    unet, params, args = tiny
    chunked = unet.clone(compute=Compute(attention_query_chunk=chunk, remat_policy=remat))
    _, maps = unet.config.module_names()
    tap = "up_blocks.1.attentions.1"

    def loss(model, p):
        out = model.apply({"params": p}, *args, taps=(tap,), attn_maps=tuple(maps[:1]))
        return jnp.sum(out.sample ** 2) + jnp.sum(out.taps[tap]) + jnp.sum(out.attn[maps[0]] ** 2)

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(unet, p)))(params)
    value_c, grads_c = jax.jit(jax.value_and_grad(lambda p: loss(chunked, p)))(params)
    np.testing.assert_allclose(value_c, value, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g_c = grads_c
        for key in path:
            g_c = g_c[key.key]
        assert rel_err(g_c, g) <= 1e-5, jax.tree_util.keystr(path)


def test_the_attention_kernel_switch_reaches_every_layer_that_records_no_map(tiny, monkeypatch):
    """compute.attention='dot_product': the layers without a recorded map call jax.nn.dot_product_attention (the
    'xla' core never does), the one with a map keeps the core; the values stay those of the core."""
    from vpd_jax.models import attention

    unet, params, args = tiny
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    _, maps = unet.config.module_names()
    attention_layers = sum(1 for name in maps if name.endswith(("attn1", "attn2")))

    def run(model):
        calls.clear()
        out = jax.jit(lambda p: model.apply({"params": p}, *args, attn_maps=tuple(maps[:1])))(params)
        return out.sample, len(calls)

    core, core_calls = run(unet)
    switched, switched_calls = run(unet.clone(compute=Compute(attention="dot_product")))
    assert core_calls == 0 and switched_calls == attention_layers - 1
    assert rel_err(np.asarray(switched), np.asarray(core)) < 1e-5
