"""LD-ZNet's released model, end to end (slow: builds, imports and compiles a tiny LD-ZNet): a tiny PyTorch
LatentSeg with the original's module names and forward order (tests/helpers/original_ldznet.py) is saved as its
Lightning checkpoint, imported into a run directory (vpd_jax/apps/import_released.py), restored as eval.py
restores it, and run through our model with the same randomness (VAE sample, SD timesteps and noise, which our
model draws from one key per example). Logits and ZNet's output (before the 1-channel head, which at random init
hardly depends on its input) agree within 1e-4 with the EMA weights the original predicts with."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from tests.helpers import original_ldznet as orig
from tests.helpers.original_vpd import nchw, nhwc
from vpd_jax.apps.import_released import import_released
from vpd_jax.models.diffusion import draw_timesteps
from vpd_jax.run.config import base_config
from vpd_jax.run.setup import setup
from vpd_jax.run.start import restore_step
from vpd_jax.weights.released import convert_released, read_released

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
SIZE, TOKENS = 64, 8


def rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def model_randomness(keys: jax.Array, latent_shape: tuple[int, ...]):
    """The VAE noise, SD timesteps and SD noise LDZNet draws from its per-example keys (vpd_jax/models/ldznet.py:
    each key split in three, one each)."""
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    normal = jax.vmap(lambda k: jax.random.normal(k, latent_shape))
    return np.array(normal(split[:, 0])), np.array(draw_timesteps(split[:, 1], 300, 500)), np.array(
        normal(split[:, 2]))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ldznet")
    reference = orig.LatentSeg(image_size=SIZE)
    file = str(tmp / "LDZNet_txt2mask.ckpt")
    orig.save_lightning(reference, file)
    c = base_config("ldznet", "vpd_shapes/small")
    c.model.arch, c.model.tokenizer, c.model.pool_image_size = "tiny", "hash", SIZE
    workdir = str(tmp / "run")
    result = import_released(c, file, workdir)
    run = setup(result.config)
    state, _ = restore_step(run.trainer, os.path.join(workdir, "checkpoints"))
    variables = jax.device_get(run.trainer.variables(state))

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    token_ids = rng.integers(0, orig.TINY.text.vocab_size, (2, TOKENS)).astype(np.int32)
    keys = jax.random.split(jax.random.key(7), 2)
    vae_noise, timesteps, sd_noise = model_randomness(keys, (SIZE // 8, SIZE // 8, 4))
    with torch.no_grad():
        expected = nhwc(reference(nchw(images), torch.from_numpy(token_ids).long(), nchw(vae_noise),
                                  torch.from_numpy(timesteps).long(), nchw(sd_noise)))
    expected_znet = nhwc(reference.znet_sample)

    @jax.jit
    def forward(v):
        logits, state = run.task.model.apply(v, images, token_ids, keys, mutable=["intermediates"])
        return logits, state["intermediates"]["znet_sample"][0]

    return dict(reference=reference, file=file, state=read_released(file, "ldznet"), variables=variables,
                forward=forward, expected=expected, expected_znet=expected_znet,
                inputs=(images, token_ids, vae_noise, timesteps, sd_noise))


def _abstract(variables):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), variables)


def _max_error(imported, variables) -> float:
    logits, znet = imported["forward"](variables)
    return max(rel_err(logits, imported["expected"]), rel_err(znet, imported["expected_znet"]))


def test_logits_match_the_original_with_its_ema_weights(imported):
    assert _max_error(imported, imported["variables"]) <= TOLERANCE


def test_the_live_weights_are_not_the_ones_the_original_predicts_with(imported):
    variables, mapped = convert_released(imported["state"], "ldznet", _abstract(imported["variables"]),
                                         source=imported["file"], use_ema=False)
    assert all(k.startswith("model_ema.") for k, why in mapped.dropped.items() if "EMA copy" in why)
    assert _max_error(imported, variables) > 10 * TOLERANCE


@pytest.mark.parametrize("pair", [("attn3.to_q", "attn3.to_v"), ("attn1.to_v", "attn3.to_v")])
def test_a_swapped_key_breaks_parity(imported, pair):
    site = "model_ema.diffusion_modeloutput_blocks21transformer_blocks0"  # up_blocks.1.attentions.0, EMA copy
    a, b = (f"{site}{name.replace('.', '')}weight" for name in pair)
    state = dict(imported["state"])
    state[a], state[b] = state[b], state[a]
    variables, _ = convert_released(state, "ldznet", _abstract(imported["variables"]), source=imported["file"])
    assert _max_error(imported, variables) > 10 * TOLERANCE


def test_dropped_keys_are_unused_by_the_original(imported):
    abstract = _abstract(imported["variables"])
    _, mapped = convert_released(imported["state"], "ldznet", abstract, source=imported["file"])
    reasons = set(mapped.dropped.values())
    assert any("after the last injection site" in r for r in reasons) and any("decoder" in r for r in reasons)
    nan_state = {k: (np.full_like(v, np.nan) if k in mapped.dropped and v.dtype.kind == "f" else v)
                 for k, v in imported["state"].items()}
    variables, _ = convert_released(nan_state, "ldznet", abstract, source=imported["file"])
    jax.tree.map(np.testing.assert_array_equal, variables, imported["variables"])

    # In the original: the VAE decoder and the frozen UNet's blocks after the last site hold NaN; same logits.
    reference = imported["reference"]
    sd_unet = reference.sd_features_stage_model.model.model.diffusion_model
    poisoned = [*reference.first_stage_model.decoder.parameters(), *reference.first_stage_model.post_quant_conv
                .parameters(), *sd_unet.up_blocks[2].parameters(), *sd_unet.up_blocks[3].parameters(),
                *sd_unet.conv_out.parameters()]
    backup = [p.detach().clone() for p in poisoned]
    images, token_ids, vae_noise, timesteps, sd_noise = imported["inputs"]
    try:
        with torch.no_grad():
            for p in poisoned:
                p.fill_(float("nan"))
            logits = nhwc(reference(nchw(images), torch.from_numpy(token_ids).long(), nchw(vae_noise),
                                    torch.from_numpy(timesteps).long(), nchw(sd_noise)))
    finally:
        with torch.no_grad():
            for p, value in zip(poisoned, backup):
                p.copy_(value)
    np.testing.assert_array_equal(logits, imported["expected"])
