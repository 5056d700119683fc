"""VAE encoder parity with diffusers' AutoencoderKL, through save_pretrained -> load_vae."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference_models import max_rel_diff, save_tiny_vae
from vpd_jax.models.vae import AutoencoderKLEncoder, DiagonalGaussian, VAEConfig
from vpd_jax.weights import load_vae

TOLERANCE = 1e-4


def _encode_both(folder, model, size=(32, 32), batch=2, seed=0):
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, *size)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
    module, params = load_vae(folder)
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return ours, posterior.mean.numpy().transpose(0, 2, 3, 1), posterior.logvar.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("config, size", [
    (dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4), (32, 32)),
    # three levels, two resnets per level, channel change inside a level (conv_shortcut), odd-sized input
    # (the asymmetric downsample padding decides the output size and the border values)
    (dict(block_out_channels=(8, 16, 24), layers_per_block=2, norm_num_groups=8, latent_channels=3), (27, 21)),
    (dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=2, mid_block_add_attention=False,
          use_quant_conv=False), (16, 24)),
])
def test_posterior_matches_diffusers(tmp_path, config, size):
    model = save_tiny_vae(str(tmp_path), seed=1, **config)
    ours, mean, logvar = _encode_both(str(tmp_path), model, size)
    assert ours.mean.shape == mean.shape
    assert max_rel_diff(ours.mean, mean) <= TOLERANCE
    assert max_rel_diff(ours.logvar, logvar) <= TOLERANCE
    assert max_rel_diff(ours.mode(), mean) <= TOLERANCE


def test_logvar_is_clipped_like_diffusers(tmp_path):
    model = save_tiny_vae(str(tmp_path), seed=2)
    with torch.no_grad():  # push the log-variance channels of quant_conv far outside [-30, 20]
        model.quant_conv.bias[4:] = torch.tensor([-80.0, -40.0, 40.0, 80.0])
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    ours, _, logvar = _encode_both(str(tmp_path), model)
    assert logvar.min() == -30.0 and logvar.max() == 20.0
    np.testing.assert_array_equal(np.asarray(ours.logvar)[..., 0], -30.0)
    np.testing.assert_array_equal(np.asarray(ours.logvar)[..., 3], 20.0)
    assert max_rel_diff(ours.logvar, logvar) <= TOLERANCE


def test_group_norm_eps_matters_and_matches(tmp_path):
    """With a near-constant input and no conv_in bias, GroupNorm variances are ~1e-8, so an eps other than
    diffusers' 1e-6 changes the result far beyond the tolerance."""
    model = save_tiny_vae(str(tmp_path), seed=3)
    with torch.no_grad():
        model.encoder.conv_in.bias.zero_()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    x = 1e-4 * np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(x)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
    module, params = load_vae(str(tmp_path))
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert max_rel_diff(ours.mean, mean) <= TOLERANCE


def test_sample_uses_mean_and_std():
    mean = jnp.full((4000, 2), 3.0)
    posterior = DiagonalGaussian(mean=mean, logvar=jnp.stack([jnp.zeros(4000), jnp.full(4000, 2 * np.log(0.5))], -1))
    draws = posterior.sample(jax.random.key(0))
    np.testing.assert_allclose(np.asarray(posterior.std[0]), [1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(draws.mean(0)), [3.0, 3.0], atol=0.05)
    np.testing.assert_allclose(np.asarray(draws.std(0)), [1.0, 0.5], rtol=0.05)
    assert not np.array_equal(draws, posterior.sample(jax.random.key(1)))
    # a pytree: goes through jit
    assert jax.jit(lambda p: p)(posterior).mean.shape == (4000, 2)


def test_param_tree_uses_diffusers_names():
    module = AutoencoderKLEncoder(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4))
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())
    params = shapes["params"]
    assert "kernel" in params["encoder"]["down_blocks_0"]["resnets_0"]["conv1"]
    assert set(params["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
    assert "conv" in params["encoder"]["down_blocks_0"]["downsamplers_0"]
    assert "downsamplers_0" not in params["encoder"]["down_blocks_1"]
    assert params["quant_conv"]["kernel"].value.shape == (1, 1, 8, 8)
    assert params["encoder"]["conv_in"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")


@pytest.mark.parametrize("field, value, message", [
    ("act_fn", "gelu", "act_fn"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "AttnDownEncoderBlock2D"),
    ("norm_num_groups", 3, "norm_num_groups"),
    ("some_new_option", True, "some_new_option"),
    ("_class_name", "AutoencoderTiny", "_class_name"),
])
def test_config_rejects_unsupported_fields(field, value, message):
    config = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
              "scaling_factor": 0.18215, "latents_mean": None}
    VAEConfig.from_dict(config)
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_dict({**config, field: value})
