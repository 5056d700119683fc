"""VPD wrapper and task models: feature pyramid and attention maps
(docs/reference.md, "VPD taps", "VPD attention maps"), the glue between the parts by value (the task models against
their parts composed in the test), task outputs, training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.variables import random_variables
from vpd_jax import losses
from vpd_jax.data import shapes
from vpd_jax.models.clip_text import CLIPTextConfig
from vpd_jax.models.heads import DepthHead, SemanticFPN
from vpd_jax.models.text_adapter import TextAdapter
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import AutoencoderKLEncoder, VAEConfig
from vpd_jax.models.vpd import VPDDepth, VPDRefer, VPDSeg, feature_spec

S = jax.ShapeDtypeStruct
TINY_VAE = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_UNETS = {
    "sd1": UNetConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=(1, 1, 1, 1), num_attention_heads=(2,) * 4,
                      cross_attention_dim=16, norm_num_groups=4),
    "sd2": UNetConfig(block_out_channels=(16, 16, 24, 24), layers_per_block=(1, 1, 1, 1),
                      num_attention_heads=(2, 2, 4, 4), cross_attention_dim=16, norm_num_groups=4,
                      use_linear_projection=True, upcast_attention=True),
}
TINY_CLIP = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=12, eos_token_id=63)
TINY_HEADS = dict(fpn_channels=16)
TINY_DEPTH = dict(fusion_channels=32, num_filters=(8, 8, 8), decoder_channels=8)


N_CLASSES = len(shapes.SEMANTIC_CLASSES) - 1  # vpd_shapes labels after reduce_zero_label


@functools.lru_cache(maxsize=1)
def _scenes():
    config = shapes.ShapesConfig(height=64, width=64)
    return [scene for _, scene in shapes.iter_scenes(seed=0, split="train", count=2, config=config)]


def _images():
    return jnp.asarray(np.stack([s.image for s in _scenes()]), jnp.float32) / 127.5 - 1.0


def _abstract_forward(model, *args):
    """(output, sown feature pyramid) as shapes: one trace of init, which keeps the intermediates it sows."""
    out, variables = jax.eval_shape(
        lambda *a: model.init_with_output(jax.random.key(0), *a, train=False, mutable=True), *args)
    return out, variables["intermediates"]["features"][0]


@pytest.fixture(scope="module")
def seg():
    """A tiny SD1-style VPDSeg on two vpd_shapes scenes with host-random variables, for the tests below."""
    model = VPDSeg(unet=TINY_UNETS["sd1"], vae=TINY_VAE, num_classes=N_CLASSES, **TINY_HEADS)
    embeddings = jax.random.normal(jax.random.key(2), (N_CLASSES, 16))
    args = (_images(), embeddings)
    return model, random_variables(model, *args, train=False), args


@pytest.fixture(scope="module")
def seg_forward(seg):
    """The seg model's inference forward with its sown features, compiled once for the tests that read it."""
    model, _, _ = seg
    return jax.jit(lambda v, *a: model.apply(v, *a, train=False, mutable=["intermediates"]))


def test_sd15_feature_pyramid_and_map_selection_at_512():
    """The reference channel counts (docs/reference.md, "VPD attention maps") and the ten selected maps, from shapes
    alone (no compute)."""
    spec = feature_spec(UNetConfig(), (512, 512), use_attn=True)
    assert spec.taps == ("up_blocks.3", "up_blocks.2.attentions.1", "up_blocks.1.attentions.1", "up_blocks.0.resnets.1")
    expected_maps = {f"{b}.attentions.{j}.transformer_blocks.0.attn2"
                     for b, js in (("down_blocks.1", (0, 1)), ("down_blocks.2", (0, 1)), ("up_blocks.1", (0, 1, 2)),
                                   ("up_blocks.2", (0, 1, 2))) for j in js}
    assert set(spec.attn_layers) == expected_maps

    def pyramid(model, *args):
        return [f.shape[1:] for f in _abstract_forward(model, *args)[1]]

    f32 = jnp.float32
    assert pyramid(VPDSeg(), S((1, 512, 512, 3), f32), S((150, 768), f32)) == [
        (64, 64, 320), (32, 32, 790), (16, 16, 1430), (8, 8, 1280)]
    assert pyramid(VPDRefer(), S((1, 512, 512, 3), f32), S((1, 77), jnp.int32)) == [
        (64, 64, 320), (32, 32, 717), (16, 16, 1357), (8, 8, 1280)]
    assert pyramid(VPDDepth(), S((1, 480, 480, 3), f32), S((1,), jnp.int32), S((27, 768), f32)) == [
        (64, 64, 320), (32, 32, 640), (16, 16, 1280), (8, 8, 1280)]


@pytest.mark.parametrize("unet", ["sd1", "sd2"])
def test_tiny_pyramid_channels(unet):
    config = TINY_UNETS[unet]
    model = VPDSeg(unet=config, vae=TINY_VAE, num_classes=5, **TINY_HEADS)
    args = (S((2, 64, 64, 3), jnp.float32), S((5, 16), jnp.float32))
    logits, features = _abstract_forward(model, *args)
    c = config.block_out_channels
    assert [f.shape for f in features] == [
        (2, 8, 8, c[0]), (2, 4, 4, c[1] + 5), (2, 2, 2, c[2] + 5), (2, 1, 1, c[3])]
    assert logits.shape == (2, 64, 64, 5)


def test_attention_channels_are_probabilities(seg, seg_forward):
    _, variables, args = seg
    _, state = seg_forward(variables, *args)
    features = state["intermediates"]["features"][0]
    for level in (1, 2):
        maps = np.asarray(features[level][..., -N_CLASSES:])
        assert (maps >= 0).all()
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # a mean of softmaxes over the class tokens
    assert features[0].shape[-1] == TINY_UNETS["sd1"].block_out_channels[0]  # no maps at the finest level


@pytest.mark.parametrize("stop_grad, expect_zero", [(True, True), (False, False)])
def test_attention_channels_carry_no_gradient_with_stop_grad(seg, stop_grad, expect_zero):
    """stop_grad_attn: the maps carry no gradient to the UNet and adapter; the VAE sees none unless train_vae (the
    demo's scratch VAE), which the second case also switches on."""
    model, variables, args = seg
    model = model.clone(stop_grad_attn=stop_grad, train_vae=not expect_zero)

    @jax.jit
    def grads(params):
        def attention_channels(p):
            _, state = model.apply({**variables, "params": p}, *args, train=False, mutable=["intermediates"])
            features = state["intermediates"]["features"][0]
            # Weighted so that the sum-to-one constraint does not zero the gradient by itself.
            return sum(jnp.sum(f[..., -N_CLASSES:] * jnp.arange(1.0, N_CLASSES + 1)) for f in features[1:3])
        return jax.grad(attention_channels)(params)

    g = grads(variables["params"])
    norms = [float(optax.tree.norm(g[part])) for part in ("unet", "text_adapter", "vae")]
    if expect_zero:
        assert norms == [0.0, 0.0, 0.0]
    else:
        assert min(norms) > 0.0, norms


# ---- the glue by value: each task model against its parts composed here from the same variables ---------------
# What is composed by hand below (docs/architecture.md, "Data flow of a VPD task"; docs/reference.md, "VPD backbone",
# "VPD attention maps", "Depth model"): image -> VAE posterior mean, unscaled -> UNet at t = 1 with the adapted text
# context -> four taps, finest first, with the attn2 maps of each resolution averaged and concatenated after that
# resolution's feature -> head -> output at the input size.

SD1_TAPS = ("up_blocks.3", "up_blocks.2.attentions.1", "up_blocks.1.attentions.1", "up_blocks.0.resnets.1")
# The attn2 layers of TINY_UNETS['sd1'] on a 64 px image (8x8 latent) with at most (64/16)^2 = 16 queries, by the
# feature level they join: 4x4 (level 1) and 2x2 (level 2). 8x8 has 64 queries; the mid block's are never used.
SD1_MAPS_64PX = {
    1: ("down_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"),
    2: ("down_blocks.2.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"),
}
GLUE_RTOL = 1e-5  # relative to the largest value: float32 rounding of the same operations in another program


def _pyramid(unet_config, vae_config, params, images, context, maps_by_level):
    """The four feature levels of images in [-1, 1], composed from the VAE, UNet and adapter alone."""
    latents = AutoencoderKLEncoder(vae_config).apply({"params": params["vae"]}, images).mean
    maps = {level: [f"{layer}.transformer_blocks.0.attn2" for layer in layers]
            for level, layers in maps_by_level.items()}
    out = UNet2DConditionModel(unet_config).apply(
        {"params": params["unet"]}, latents, jnp.ones((images.shape[0],), jnp.int32), context, taps=SD1_TAPS,
        attn_maps=tuple(name for names in maps.values() for name in names), output_sample=False)
    features = [out.taps[name] for name in SD1_TAPS]
    for level, names in maps.items():
        mean = sum(out.attn[name] for name in names) / len(names)
        features[level] = jnp.concatenate([features[level], mean], axis=-1)
    return features


def _bilinear_like_torch(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
    out = F.interpolate(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                        align_corners=align_corners)
    return out.permute(0, 2, 3, 1).numpy()


def _assert_close(ours, reference, what: str, rtol: float = GLUE_RTOL) -> None:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error <= rtol, f"{what}: relative difference {error:.2e} > {rtol:.0e}"


def test_seg_is_its_parts_composed(seg, seg_forward):
    """VPDSeg = FPN head on [VAE mean -> UNet(t = 1) -> taps + per-resolution mean maps], upsampled to the input
    size as PyTorch's bilinear with align_corners=False (mmseg's resize of the logits)."""
    model, variables, (images, embeddings) = seg
    logits, state = seg_forward(variables, images, embeddings)

    @jax.jit
    def composed(variables, images, embeddings):
        params = variables["params"]
        tokens = TextAdapter(model.gamma_init).apply({"params": params["text_adapter"]}, embeddings)
        context = jnp.broadcast_to(tokens[None], (images.shape[0], *tokens.shape))
        features = _pyramid(model.unet, model.vae, params, images, context, SD1_MAPS_64PX)
        head = SemanticFPN(model.num_classes, model.fpn_channels, model.dropout_ratio, model.bn_momentum)
        return features, head.apply({"params": params["head"], "batch_stats": variables["batch_stats"]["head"]},
                                    features, False)

    features, head_logits = composed(variables, images, embeddings)
    for level, (ours, reference) in enumerate(zip(state["intermediates"]["features"][0], features)):
        _assert_close(ours, reference, f"feature level {level}")
    assert head_logits.shape[1:3] == (8, 8)  # the head works at 1/8 of the input: the resize is not a no-op
    _assert_close(logits, _bilinear_like_torch(head_logits, images.shape[1:3], align_corners=False), "logits")


def test_depth_pads_bottom_right_and_crops_back():
    """VPDDepth on sides that are multiples of 32, not of 64: the image is zero-padded bottom/right to 64 px
    multiples, the depth head's fusion map is cropped to the input's (H/32, W/32), and its output is the input
    size; by value against the parts composed on the padded image."""
    model = VPDDepth(unet=TINY_UNETS["sd1"], vae=TINY_VAE, **TINY_DEPTH)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 96, 3)), jnp.float32)  # padded to 64 x 128
    class_ids, embeddings = jnp.asarray([3, 0], jnp.int32), jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    variables = random_variables(model, images, class_ids, embeddings, train=False, seed=4)
    # Spread the output over (0, max_depth): at this scale the last conv's output sits near sigmoid(0) = 0.5, where
    # a wrong input would move the depth by less than the tolerance.
    last = variables["params"]["head"]["last_layer_depth_2"]
    last["kernel"] = last["kernel"] * 30.0
    depth = jax.jit(lambda v, *a: model.apply(v, *a, train=False))(variables, images, class_ids, embeddings)

    @jax.jit
    def composed(variables, padded, class_ids, embeddings):
        params = variables["params"]
        context = TextAdapter(model.gamma_init).apply({"params": params["text_adapter"]}, embeddings[class_ids])
        features = _pyramid(model.unet, model.vae, params, padded, context[:, None], {})
        head = DepthHead(model.max_depth, model.fusion_channels, model.num_filters, model.deconv_kernels,
                         model.decoder_channels, model.bn_momentum)
        return head.apply({"params": params["head"], "batch_stats": variables["batch_stats"]["head"]}, features,
                          False, fusion_size=(1, 3))[..., 0]

    assert depth.shape == (2, 32, 96)
    padded = jnp.pad(images, ((0, 0), (0, 32), (0, 32), (0, 0)))
    _assert_close(depth, composed(variables, padded, class_ids, embeddings), "depth")
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(lambda i: model.init(jax.random.key(0), i, class_ids, embeddings, train=False),
                       jnp.zeros((2, 100, 160, 3)))


# ---- a few training steps on vpd_shapes scenes reduce each task's loss ---------------------------------------


def _train(model, loss_fn, args, variables=None, steps=8, lr=3e-3):
    variables = random_variables(model, *args, train=False) if variables is None else variables
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, rng):
        def loss(p):
            out, updates = model.apply({"params": p, "batch_stats": batch_stats}, *args, train=True,
                                       mutable=["batch_stats"], rngs={"dropout": rng})
            return loss_fn(out), updates["batch_stats"]
        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        grads = {**grads, "vae": jax.tree.map(jnp.zeros_like, grads["vae"])}  # the VAE is frozen
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, value

    values = []
    for i in range(steps):
        params, batch_stats, opt_state, value = step(params, batch_stats, opt_state, jax.random.key(i))
        values.append(float(value))
    return values


@pytest.mark.slow
def test_training_steps_reduce_the_loss_of_each_task(seg):
    images = _images()
    labels = jnp.asarray(np.stack([s.label for s in _scenes()]).astype(np.int32) - 1)  # reduce_zero_label
    seg_model, seg_variables, seg_args = seg
    seg_losses = _train(seg_model, lambda logits: losses.segmentation_loss(logits, labels), seg_args, seg_variables)

    depth_gt = jnp.asarray(np.stack([s.depth for s in _scenes()]))
    depth = VPDDepth(unet=TINY_UNETS["sd1"], vae=TINY_VAE, **TINY_DEPTH)
    scene_ids = jnp.asarray([s.scene_class for s in _scenes()], jnp.int32)
    depth_losses = _train(depth, lambda pred: losses.silog_loss(pred, depth_gt),
                          (images, scene_ids, jax.random.normal(jax.random.key(4), (27, 16))))

    masks = jnp.asarray(np.stack([s.instance == 0 for s in _scenes()]).astype(np.int32))
    refer = VPDRefer(unet=TINY_UNETS["sd2"], vae=TINY_VAE, text=TINY_CLIP)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 63)
    refer_losses = _train(refer, lambda logits: losses.referring_loss(logits, masks), (images, tokens))

    for name, values in (("seg", seg_losses), ("depth", depth_losses), ("refer", refer_losses)):
        assert np.isfinite(values).all(), (name, values)
        assert values[-1] < 0.8 * values[0], (name, values)
