"""VPD wrapper and task models: feature pyramid and attention maps (spec/vpd.md 1.3-1.4), task outputs, training."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpd_jax import losses
from vpd_jax.data import shapes
from vpd_jax.models.clip_text import CLIPTextConfig
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vae import VAEConfig
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


def _init(model, *args):
    return jax.jit(lambda *a: nn.meta.unbox(model.init(jax.random.key(0, impl="rbg"), *a, train=False)))(*args)


@functools.lru_cache(maxsize=1)
def _scenes():
    config = shapes.ShapesConfig(height=64, width=64)
    return [scene for _, scene in shapes.iter_scenes(seed=0, split="train", count=2, config=config)]


def _images():
    return jnp.asarray(np.stack([s.image for s in _scenes()]), jnp.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def seg():
    """A tiny SD1-style VPDSeg on two vpd_shapes scenes, initialised once for the tests below."""
    model = VPDSeg(unet=TINY_UNETS["sd1"], vae=TINY_VAE, num_classes=N_CLASSES, **TINY_HEADS)
    embeddings = jax.random.normal(jax.random.key(2), (N_CLASSES, 16))
    args = (_images(), embeddings)
    return model, _init(model, *args), args


def test_sd15_feature_pyramid_and_map_selection_at_512():
    """The reference channel counts (spec 1.4) and the ten selected maps, from shapes alone (no compute)."""
    spec = feature_spec(UNetConfig(), (512, 512), use_attn=True)
    assert spec.taps == ("up_blocks.3", "up_blocks.2.attentions.1", "up_blocks.1.attentions.1", "up_blocks.0.resnets.1")
    expected_maps = {f"{b}.attentions.{j}.transformer_blocks.0.attn2"
                     for b, js in (("down_blocks.1", (0, 1)), ("down_blocks.2", (0, 1)), ("up_blocks.1", (0, 1, 2)),
                                   ("up_blocks.2", (0, 1, 2))) for j in js}
    assert set(spec.attn_layers) == expected_maps

    def pyramid(model, *args):
        variables = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, train=False), *args)
        _, state = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False, mutable=["intermediates"]),
                                  variables, *args)
        return [f.shape[1:] for f in state["intermediates"]["features"][0]]

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
    variables = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, train=False), *args)
    logits, state = jax.eval_shape(lambda v, *a: model.apply(v, *a, train=False, mutable=["intermediates"]),
                                   variables, *args)
    c = config.block_out_channels
    assert [f.shape for f in state["intermediates"]["features"][0]] == [
        (2, 8, 8, c[0]), (2, 4, 4, c[1] + 5), (2, 2, 2, c[2] + 5), (2, 1, 1, c[3])]
    assert logits.shape == (2, 64, 64, 5)


def test_attention_channels_are_probabilities(seg):
    model, variables, args = seg
    _, state = jax.jit(lambda v, *a: model.apply(v, *a, train=False, mutable=["intermediates"]))(variables, *args)
    features = state["intermediates"]["features"][0]
    for level in (1, 2):
        maps = np.asarray(features[level][..., -N_CLASSES:])
        assert (maps >= 0).all()
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # a mean of softmaxes over the class tokens
    assert features[0].shape[-1] == TINY_UNETS["sd1"].block_out_channels[0]  # no maps at the finest level


@pytest.mark.parametrize("stop_grad, expect_zero", [(True, True), (False, False)])
def test_attention_channels_carry_no_gradient_with_stop_grad(seg, stop_grad, expect_zero):
    model, variables, args = seg
    model = model.clone(stop_grad_attn=stop_grad)

    @jax.jit
    def grads(params):
        def attention_channels(p):
            _, state = model.apply({**variables, "params": p}, *args, train=False, mutable=["intermediates"])
            features = state["intermediates"]["features"][0]
            # Weighted so that the sum-to-one constraint does not zero the gradient by itself.
            return sum(jnp.sum(f[..., -N_CLASSES:] * jnp.arange(1.0, N_CLASSES + 1)) for f in features[1:3])
        return jax.grad(attention_channels)(params)

    g = grads(variables["params"])
    unet_norm, adapter_norm = optax.tree.norm(g["unet"]), optax.tree.norm(g["text_adapter"])
    if expect_zero:
        assert float(unet_norm) == 0.0 and float(adapter_norm) == 0.0
    else:
        assert float(unet_norm) > 0.0 and float(adapter_norm) > 0.0


def test_depth_pads_to_64_and_returns_the_input_size():
    model = VPDDepth(unet=TINY_UNETS["sd1"], vae=TINY_VAE, **TINY_DEPTH)
    images = jnp.zeros((2, 96, 160, 3))  # multiples of 32, not of 64: padded to 128 x 192
    variables = jax.eval_shape(lambda i: model.init(jax.random.key(0), i, jnp.zeros(2, jnp.int32), jnp.zeros((4, 16)),
                                                    train=False), images)
    out = jax.eval_shape(lambda v, i: model.apply(v, i, jnp.zeros(2, jnp.int32), jnp.zeros((4, 16)), train=False),
                         variables, images)
    assert out.shape == (2, 96, 160)
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(lambda i: model.init(jax.random.key(0), i, jnp.zeros(2, jnp.int32), jnp.zeros((4, 16)),
                                            train=False), jnp.zeros((2, 100, 160, 3)))


# ---- a few training steps on vpd_shapes scenes reduce each task's loss ---------------------------------------


def _train(model, loss_fn, args, variables=None, steps=8, lr=3e-3):
    variables = _init(model, *args) if variables is None else variables
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
