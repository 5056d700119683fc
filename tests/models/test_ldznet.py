"""ZNet / LD-ZNet (docs/reference.md, "LD-ZNet at a glance" to "attn3"): sizes, taps, the pool and attn3 against
PyTorch modules written from docs/reference.md, SD initialisation, and the data flow (t = 0, latent scale, injection
pairing, frozen branch)."""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from tests.models.ldznet_reference import (TINY_TEXT, TINY_UNET, TINY_VAE, LDBasicTransformerBlock,
                                           LDSpatialTransformer, TorchAttentionPool2d, host_init, port_block,
                                           port_pool, port_spatial_transformer, randomize, rel_err)
from vpd_jax.models.attention import AttentionPool2d
from vpd_jax.models.clip_text import CLIPTextModel
from vpd_jax.models.diffusion import NoiseSchedule, draw_timesteps
from vpd_jax.models.ldznet import (LDZNet, UpsampleHead, count_params, frozen_unet_modules, injection_sites,
                                   is_new_parameter, params_from_sd)
from vpd_jax.models.presets import architecture
from vpd_jax.models.transformer import BasicTransformerBlock, Transformer2DModel
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.vae import AutoencoderKLEncoder

TOL = 1e-4
SD1_SITES = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0",
             "up_blocks.1.attentions.1", "up_blocks.1.attentions.2")


def _abstract_params(model: LDZNet, size: int, batch: int = 1, tokens: int = 8) -> dict:
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    token_ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images, token_ids, keys))["params"]


# ---------------------------------------------------------------------------------------------------- sizes


def test_sd1_injection_sites_are_the_five_1280_channel_blocks():
    """1-based SA 6-10, not down_blocks.2.attentions.0 nor up_blocks.0 (docs/reference.md, "Injection sites")."""
    assert injection_sites(architecture("sd15").unet) == SD1_SITES


def test_sd1_parameter_counts_match_the_reference():
    """LD-ZNet (everything but the frozen extractor, VAE and CLIP) 925,882,936; ZNet 859,512,376 = SD UNet
    859,520,964 - 8,643 (conv_out 4 -> 1 channel) + 55 (head) (docs/reference.md, "LD-ZNet at a glance", "attn3")."""
    arch = architecture("sd15")
    sd_unet = UNet2DConditionModel(arch.unet)
    sd_count = count_params(jax.eval_shape(sd_unet.init, jax.random.key(0), *sd_unet.dummy_inputs())["params"])
    assert sd_count == 859_520_964
    counts = {}
    for inject in (True, False):
        params = _abstract_params(LDZNet(arch.unet, arch.vae, arch.text, inject=inject), 64)
        counts[inject] = count_params(params["znet"]) + count_params(params["head"])
        assert ("sd_unet" in params) == inject
    assert counts[False] == 859_512_376 == sd_count - 8_643 + 55
    assert counts[True] == 925_882_936
    assert counts[True] - counts[False] == 66_370_560  # 5 pools + 5 attn3/norm_sd (docs/reference.md, "attn3")
    ldz = _abstract_params(LDZNet(arch.unet, arch.vae, arch.text), 64)
    pools = {p: v.shape for p, v in flatten_dict(ldz["znet"]).items() if p[-1] == "positional_embedding"}
    # 6x6 and 12x12 grids at 384 (docs/reference.md, "Attention pools")
    assert sorted(pools.values()) == [(37, 1280)] + [(145, 1280)] * 4


def _expected_additions(config, sites, pool_image_size: int) -> int:
    """Per site: pool (qkv C->3C, c_proj C->C, pos-emb (1 + S^2) x C) + attn3 (3 C^2 + C^2 + C) + norm_sd (2C)
    (docs/reference.md, "Attention pools", "attn3"); minus conv_out's dropped channels; plus the 55 head values."""
    n = len(config.block_out_channels)
    latent = pool_image_size // 8
    total = 0
    for name in sites:
        kind, index = name.split(".")[:2]
        level = n - 1 if kind == "mid_block" else int(index) if kind == "down_blocks" else n - 1 - int(index)
        c = config.block_out_channels[level]
        side = math.ceil(latent / 2 ** level)
        total += (c * 3 * c + 3 * c) + (c * c + c) + (1 + side * side) * c + 4 * c * c + c + 2 * c
    conv_out = config.conv_out_kernel ** 2 * config.block_out_channels[0] + 1
    return total - conv_out * (config.out_channels - 1) + 55


@pytest.mark.parametrize("arch_name", ["sd21", "tiny", "test"])
def test_parameter_additions_follow_the_reference_formula(arch_name):
    arch = (architecture(arch_name) if arch_name != "test" else
            dataclasses.replace(architecture("tiny"), unet=TINY_UNET, text=TINY_TEXT))
    unet = arch.unet
    sd_unet = UNet2DConditionModel(unet)
    sd_count = count_params(jax.eval_shape(sd_unet.init, jax.random.key(0), *sd_unet.dummy_inputs())["params"])
    model = LDZNet(unet, arch.vae, arch.text, pool_image_size=64)
    params = _abstract_params(model, 64)
    added = count_params(params["znet"]) + count_params(params["head"]) - sd_count
    assert added == _expected_additions(unet, injection_sites(unet), 64)


def test_tap_shapes_and_pool_tokens_at_384():
    """(B,12,12,1280) x 4 and (B,6,6,1280) from the frozen pass; 145 / 37 pooled tokens
    (docs/reference.md, "Injection sites", "Attention pools")."""
    unet = UNet2DConditionModel(architecture("sd15").unet)
    latent = jax.ShapeDtypeStruct((2, 48, 48, 4), jnp.float32)
    params = jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs())
    out = jax.eval_shape(lambda p, z: unet.apply(p, z, jnp.full((2,), 400), jnp.zeros((2, 77, 768)), taps=SD1_SITES,
                                                 output_sample=False), params, latent)
    assert out.sample is None
    assert {k: v.shape for k, v in out.taps.items()} == {
        "down_blocks.2.attentions.1": (2, 12, 12, 1280), "mid_block.attentions.0": (2, 6, 6, 1280),
        "up_blocks.1.attentions.0": (2, 12, 12, 1280), "up_blocks.1.attentions.1": (2, 12, 12, 1280),
        "up_blocks.1.attentions.2": (2, 12, 12, 1280)}
    for side, tokens in ((12, 145), (6, 37)):
        pool = AttentionPool2d(side, 8)
        feature = jax.ShapeDtypeStruct((2, side, side, 1280), jnp.float32)
        shape = jax.eval_shape(lambda f: pool.init_with_output(jax.random.key(0), f)[0], feature).shape
        assert shape == (2, tokens, 1280)


# ------------------------------------------------------------------------------------- parity with PyTorch


@pytest.mark.parametrize("side, hw", [(3, (3, 3)), (3, (4, 5)), (4, (2, 3))])
def test_attention_pool_matches_the_reference_definition(side, hw):
    """Mean token, pos-emb (bicubic a=-0.75 for other sizes), chunk q|k|v then heads, all tokens kept
    (docs/reference.md, "Attention pools", "Resizes")."""
    channels, heads = 32, 4
    torch_pool = randomize(TorchAttentionPool2d(side, channels, channels // heads))
    x = np.random.default_rng(0).standard_normal((2, channels, *hw)).astype(np.float32)
    with torch.no_grad():
        ref = torch_pool(torch.from_numpy(x)).numpy()
    ours = AttentionPool2d(side, heads).apply({"params": port_pool(torch_pool)}, x.transpose(0, 2, 3, 1))
    assert ours.shape == ref.shape == (2, 1 + hw[0] * hw[1], channels)
    assert rel_err(ours, ref) <= TOL


def test_attn3_block_matches_the_reference_definition():
    """attn3 between the text cross-attention and the feed-forward, pre-LN norm_sd on the query
    (docs/reference.md, "attn3")."""
    dim, heads, ctx_dim = 32, 4, 12
    torch_block = randomize(LDBasicTransformerBlock(dim, heads, dim // heads, ctx_dim, dim))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, dim)).astype(np.float32)
    context = rng.standard_normal((2, 5, ctx_dim)).astype(np.float32)
    sd_tokens = rng.standard_normal((2, 7, dim)).astype(np.float32)
    with torch.no_grad():
        ref = torch_block(*map(torch.from_numpy, (x, context, sd_tokens))).numpy()
    block = BasicTransformerBlock(heads, dim // heads, extra_cross_attention=True)
    ours, _ = block.apply({"params": port_block(torch_block)}, x, context, sd_tokens)
    assert rel_err(ours, ref) <= TOL
    # attn3 matters: without it (same weights otherwise) the output differs.
    plain = BasicTransformerBlock(heads, dim // heads)
    params = {k: v for k, v in port_block(torch_block).items() if k not in ("attn3", "norm_sd")}
    assert rel_err(plain.apply({"params": params}, x, context)[0], ref) > 1e-2


def test_injected_transformer_matches_the_reference_definition():
    """The Transformer2D with its pool: the raw SD feature is pooled by this transformer's own pool and attended to
    by its attn3 (docs/reference.md, "Attention pools", "attn3"; same-position pairing: "Injection sites")."""
    dim, heads, ctx_dim, side = 32, 4, 12, 3
    torch_st = randomize(LDSpatialTransformer(dim, heads, ctx_dim, 8, side))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, dim, 4, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, ctx_dim)).astype(np.float32)
    feature = rng.standard_normal((2, dim, 4, 4)).astype(np.float32)  # a 4x4 SD map on a 3x3 learned grid
    with torch.no_grad():
        ref = torch_st(*map(torch.from_numpy, (x, context, feature))).numpy().transpose(0, 2, 3, 1)
    module = Transformer2DModel("mid_block.attentions.0", heads, dim // heads, groups=8, attn_pool_size=side)
    ours, _ = module.apply({"params": port_spatial_transformer(torch_st)}, x.transpose(0, 2, 3, 1), context,
                           feature.transpose(0, 2, 3, 1))
    assert rel_err(ours, ref) <= TOL


# ----------------------------------------------------------------------------------------- initialisation


def test_new_layers_have_pytorch_default_init():
    """U(+-1/sqrt(fan_in)) for weights and biases (conv 1->1 3x3: 1/3; ConvT(1,1,k2): fan_in 4 -> 1/2;
    Linear/Conv1d 1280: 0.02795), LayerNorm ones/zeros, pos-emb N(0, 1)/sqrt(1280) (docs/reference.md,
    "ZNet initialisation")."""
    key = jax.random.key(0, impl="rbg")
    head = flatten_dict(nn.meta.unbox(UpsampleHead().init(key, jnp.zeros((1, 4, 4, 1))))["params"])
    for path, value in head.items():
        bound = 1 / 2 if path[0] in ("final_2", "final_6", "final_10") else 1 / 3
        assert np.abs(value).max() <= bound, path
    conv_kernels = np.concatenate([np.ravel(v) for p, v in head.items() if p[0] in ("final_0", "final_4", "final_8",
                                                                                     "final_12")])
    assert np.abs(conv_kernels).max() > 0.25  # 40 draws from U(-1/3, 1/3), not lecun_normal / zeros
    pool = flatten_dict(nn.meta.unbox(jax.jit(lambda k: AttentionPool2d(6, 8).init(
        k, jnp.zeros((1, 6, 6, 1280))))(key))["params"])
    for name in ("qkv_proj", "c_proj"):
        for leaf in ("kernel", "bias"):
            value = np.asarray(pool[(name, leaf)])
            assert 0.95 / math.sqrt(1280) < np.abs(value).max() <= 1 / math.sqrt(1280), (name, leaf)
    assert np.std(pool[("positional_embedding",)]) == pytest.approx(1 / math.sqrt(1280), rel=0.05)
    block = flatten_dict(nn.meta.unbox(jax.jit(lambda k: BasicTransformerBlock(8, 160, extra_cross_attention=True).init(
        k, jnp.zeros((1, 4, 1280)), jnp.zeros((1, 2, 8)), jnp.zeros((1, 3, 1280))))(key))["params"])
    assert np.all(block[("norm_sd", "scale")] == 1) and np.all(block[("norm_sd", "bias")] == 0)
    for leaf in (("attn3", "to_q", "kernel"), ("attn3", "to_out_0", "kernel"), ("attn3", "to_out_0", "bias")):
        assert 0.95 / math.sqrt(1280) < np.abs(block[leaf]).max() <= 1 / math.sqrt(1280), leaf
    assert ("attn3", "to_q", "bias") not in block  # no q/k/v bias (docs/reference.md, "attn3")


def test_params_from_sd_fill_the_model_except_the_new_layers():
    """ZNet = the SD UNet with conv_out sliced to channel 0; the frozen extractor = the part of the same UNet its
    pass uses; only the head and the injection modules keep their initialisation (docs/reference.md,
    "ZNet initialisation")."""
    model = LDZNet(TINY_UNET, TINY_VAE, TINY_TEXT, pool_image_size=32)
    abstract = _abstract_params(model, 32)
    sd_unet = UNet2DConditionModel(TINY_UNET)
    unet = host_init(jax.eval_shape(sd_unet.init, jax.random.key(0), *sd_unet.dummy_inputs())["params"], seed=1)
    params = params_from_sd(TINY_UNET, unet, host_init(abstract["vae"]), host_init(abstract["text_encoder"]))
    np.testing.assert_array_equal(params["znet"]["conv_out"]["kernel"], unet["conv_out"]["kernel"][..., :1])
    np.testing.assert_array_equal(params["znet"]["conv_out"]["bias"], unet["conv_out"]["bias"][:1])
    np.testing.assert_array_equal(params["sd_unet"]["mid_block"]["resnets_0"]["conv1"]["kernel"],
                                  unet["mid_block"]["resnets_0"]["conv1"]["kernel"])
    loaded, model_tree = flatten_dict(params), flatten_dict(abstract)
    assert not loaded.keys() - model_tree.keys()  # nothing unexpected
    assert {p for p in model_tree if p not in loaded} == {p for p in model_tree if is_new_parameter(p)}
    assert {p[1] for p in model_tree if is_new_parameter(p) and p[0] == "znet"} == {"down_blocks_0", "mid_block",
                                                                                     "up_blocks_1"}
    assert all(loaded[p].shape == model_tree[p].shape for p in loaded)
    assert sorted(abstract["sd_unet"]) == sorted(frozen_unet_modules(TINY_UNET, injection_sites(TINY_UNET)))
    assert "up_blocks_1" in abstract["sd_unet"] and "conv_out" not in abstract["sd_unet"]


# ----------------------------------------------------------------------------------- schedule and timesteps


def test_schedule_values_and_timestep_range():
    """abar_300 = 0.59050, abar_400 = 0.42448, abar_499 = 0.27767 (docs/reference.md, "LD-ZNet at a glance");
    t in 300..499 ("Frozen SD branch")."""
    abar = NoiseSchedule().alphas_cumprod()
    np.testing.assert_allclose(abar[[300, 400, 499]], [0.59050, 0.42448, 0.27767], atol=5e-6)
    ts = np.asarray(draw_timesteps(jax.random.split(jax.random.key(0), 4000), 300, 500))
    assert ts.min() == 300 and ts.max() == 499 and len(np.unique(ts)) == 200


# ---------------------------------------------------------------------------------------------- forward


IMAGE = 32


@pytest.fixture(scope="module")
def tiny():
    """A two-level LD-ZNet with host-random weights, inputs for two examples, and jitted forwards of LD-ZNet,
    ZNet (inject=False) and the ZNet parts applied one by one."""
    ldz = LDZNet(TINY_UNET, TINY_VAE, TINY_TEXT, pool_image_size=IMAGE)
    znet = dataclasses.replace(ldz, inject=False)
    params = host_init(_abstract_params(ldz, IMAGE), seed=3)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (2, IMAGE, IMAGE, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 63, (2, 8)), jnp.int32)
    keys = jax.random.split(jax.random.key(7), 2)
    forward = {m.inject: jax.jit(functools.partial(_logits_and_unet_sample, m)) for m in (ldz, znet)}
    return ldz, params, (images, tokens, keys), forward


def _logits_and_unet_sample(model, params, *inputs):
    """The logits, and ZNet's 1-channel UNet output before the head (much more sensitive to the weights than the
    logits of a random head, which squashes its input through one-channel convolutions and SiLUs)."""
    logits, state = model.apply({"params": params}, *inputs, mutable=["intermediates"])
    return logits, state["intermediates"]["znet_sample"][0]


def _zero_attn3(params: dict) -> dict:
    flat = flatten_dict(params)
    return unflatten_dict({p: (np.zeros_like(v) if "attn3" in p and p[-2] == "to_out_0" else v)
                           for p, v in flat.items()})


def _without_injection(params: dict) -> dict:
    flat = flatten_dict(params)
    return unflatten_dict({p: v for p, v in flat.items() if p[0] != "sd_unet" and not (
        p[0] == "znet" and is_new_parameter(p))})


def _perturbed_sd_unet(params: dict) -> dict:
    return {**params, "sd_unet": jax.tree.map(lambda v: v + 0.5 * np.sign(v), params["sd_unet"])}


def test_ldznet_with_injection_disabled_equals_znet_and_ignores_the_frozen_unet(tiny):
    """attn3's output projection zeroed = injection off: LD-ZNet then equals ZNet with the same weights, and the
    frozen UNet's weights do not matter; with attn3 live they do (the SD features reach ZNet only through attn3)."""
    _, params, inputs, forward = tiny
    off = _zero_attn3(params)
    znet_logits, znet_sample = forward[False](_without_injection(params), *inputs)
    assert znet_logits.shape == (2, IMAGE, IMAGE, 1)
    off_logits, off_sample = forward[True](off, *inputs)
    np.testing.assert_allclose(off_logits, znet_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(off_sample, znet_sample, rtol=1e-5, atol=1e-6)
    perturbed_logits, perturbed_sample = forward[True](_perturbed_sd_unet(off), *inputs)
    np.testing.assert_array_equal(perturbed_logits, off_logits)
    np.testing.assert_array_equal(perturbed_sample, off_sample)
    live = forward[True](params, *inputs)[1]
    assert rel_err(live, znet_sample) > 1e-2
    assert rel_err(forward[True](_perturbed_sd_unet(params), *inputs)[1], live) > 1e-2


def test_znet_data_flow_matches_the_spec(tiny):
    """z = 0.18215 x the VAE posterior sample drawn with the example's key, UNet at t = 0 with the CLIP
    last_hidden_state, SiLU, then the 8x head; composed here from the parts (docs/reference.md,
    "LD-ZNet at a glance", "ZNet", "LD-ZNet forward pass")."""
    _, params, (images, tokens, keys), forward = tiny
    p = _without_injection(params)

    @jax.jit
    def composed(p):
        posterior = AutoencoderKLEncoder(TINY_VAE).apply({"params": p["vae"]}, images)
        vae_keys = jax.vmap(lambda k: jax.random.split(k, 3)[0])(keys)
        noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(vae_keys)
        z = (posterior.mean + posterior.std * noise) * 0.18215
        context = CLIPTextModel(TINY_TEXT).apply({"params": p["text_encoder"]}, tokens).last_hidden_state
        unet = UNet2DConditionModel(dataclasses.replace(TINY_UNET, out_channels=1))
        out = unet.apply({"params": p["znet"]}, z, jnp.zeros((2,), jnp.int32), context).sample
        return UpsampleHead().apply({"params": p["head"]}, nn.silu(out)), out

    logits, sample = composed(p)
    ours_logits, ours_sample = forward[False](p, images, tokens, keys)
    np.testing.assert_allclose(ours_sample, sample, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_logits, logits, rtol=1e-5, atol=1e-6)


def test_randomness_comes_from_the_per_example_keys(tiny):
    _, params, (images, tokens, keys), forward = tiny
    out = forward[True](params, images, tokens, keys)[1]
    np.testing.assert_array_equal(forward[True](params, images, tokens, keys)[1], out)
    swapped = forward[True](params, images[::-1], tokens[::-1], keys[::-1])[1]
    np.testing.assert_allclose(swapped[::-1], out, rtol=1e-5, atol=1e-6)  # independent of the batch position
    other = forward[True](params, images, tokens, jax.random.split(jax.random.key(8), 2))[1]
    # VAE sample, SD t and noise are stochastic (docs/reference.md, "LD-ZNet at a glance", "Frozen SD branch")
    assert rel_err(other, out) > 1e-3


def test_other_input_sizes_resize_the_pool_grids(tiny):
    """A 48x40 input (latent 6x5) runs with the 4x4 / 2x2 learned grids bicubic-resized (docs/reference.md,
    "LD-ZNet inference script", "Attention pools")."""
    ldz, params, _, _ = tiny
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.uniform(-1, 1, (1, 48, 40, 3)), jnp.float32)
    out = jax.jit(lambda p, i: ldz.apply({"params": p}, i, jnp.ones((1, 8), jnp.int32),
                                         jax.random.split(jax.random.key(0), 1)))(params, images)
    assert out.shape == (1, 48, 40, 1) and bool(jnp.isfinite(out).all())
    pools = {"/".join(p[:2]): v.shape for p, v in flatten_dict(params["znet"]).items()
             if p[-1] == "positional_embedding"}
    assert pools == {"down_blocks_0/attentions_0": (17, 32), "mid_block/attentions_0": (5, 64),
                     "up_blocks_1/attentions_0": (17, 32), "up_blocks_1/attentions_1": (17, 32)}


def test_mean_mode_with_one_timestep_is_a_fixed_timestep(tiny):
    """'mean' over (t,) = the frozen pass at that t for every example (features averaged: (t, t) is the same);
    it differs from the reference's random t in [300, 500)."""
    ldz, params, inputs, forward = tiny
    samples = {}
    for ts in ((400,), (400, 400)):
        model = dataclasses.replace(ldz, sd_timesteps=ts, sd_timestep_mode="mean")
        samples[ts] = jax.jit(functools.partial(_logits_and_unet_sample, model))(params, *inputs)[1]
    np.testing.assert_allclose(samples[(400, 400)], samples[(400,)], rtol=1e-5, atol=1e-6)
    assert rel_err(forward[True](params, *inputs)[1], samples[(400,)]) > 1e-3


def test_invalid_settings_are_rejected(tiny):
    ldz, params, (images, tokens, keys), _ = tiny
    with pytest.raises(ValueError, match="sd_timesteps"):
        dataclasses.replace(ldz, sd_timesteps=(500, 300)).apply({"params": params}, images, tokens, keys)
    with pytest.raises(ValueError, match="divisible by 8"):
        ldz.apply({"params": params}, images[:, :30, :30], tokens, keys)
    with pytest.raises(ValueError, match="one PRNG key per example"):
        ldz.apply({"params": params}, images, tokens, keys[:1])
    with pytest.raises(ValueError, match="cross_attention_dim"):
        dataclasses.replace(ldz, text=architecture("tiny").text).apply({"params": params}, images, tokens, keys)


def test_upsample_head_init_starts_as_nearest_upsampling():
    """head_init 'upsample' (runs from scratch): the head maps x to nearest-8x-upsampled
    silu^5(silu(2 x + 4)) - 4, so ZNet's output z reaches the logits upsampled, at about unit gain (the SiLUs work
    near 4, where they are almost the identity); an unknown init is an error."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 1)), jnp.float32)
    head = UpsampleHead("upsample")
    variables = head.init(jax.random.key(0), x)
    expected = nn.silu(2.0 * x + 4.0)
    for _ in range(5):
        expected = nn.silu(expected)
    expected = jnp.repeat(jnp.repeat(expected - 4.0, 8, axis=1), 8, axis=2)
    np.testing.assert_allclose(np.asarray(head.apply(variables, x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
    # Through the model's SiLU, small z reach the logits at the same gain at every pixel, between 1 and 1.5.
    small = 1e-3 * x
    gain = (head.apply(variables, nn.silu(small)) - head.apply(variables, nn.silu(0 * x))) / np.repeat(
        np.repeat(np.asarray(small), 8, axis=1), 8, axis=2)
    np.testing.assert_allclose(np.asarray(gain), np.asarray(gain).mean(), rtol=1e-2)
    assert 1.0 <= float(gain.mean()) <= 1.5
    with pytest.raises(ValueError, match="weight_init 'zeros'"):
        UpsampleHead("zeros").init(jax.random.key(0), x)
