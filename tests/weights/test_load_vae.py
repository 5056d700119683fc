"""load_vae from diffusers folders, pipeline roots and CompVis single files."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference_models import (assert_same_params, corrupt_state_dict, numpy_state_dict, save_pipeline,
                                    save_safetensors, save_tiny_vae, vae_diffusers_to_ldm)
from vpd_jax.weights import WeightLoadingError, load_vae
from vpd_jax.weights.ldm import infer_vae_config

# Inference assumes SD's 32 groups, so the single-file tests use channel counts that allow it.
SD_LIKE = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    model = save_tiny_vae(folder, seed=5, **SD_LIKE)
    return folder, model


def _full_sd_checkpoint(vae_state):
    """A CompVis SD file: the VAE under first_stage_model., plus other components the VAE loader must not read."""
    rng = np.random.default_rng(0)
    return {
        **vae_diffusers_to_ldm(vae_state),
        "model.diffusion_model.input_blocks.0.0.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32),
        "alphas_cumprod": np.linspace(1, 0, 10).astype(np.float32),
    }


def test_test_mapping_agrees_with_diffusers_converter(vae_folder):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, model = vae_folder
    state = numpy_state_dict(model)
    ldm = vae_diffusers_to_ldm(state)
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, dict(model.config))
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)


def test_inferred_config_matches_the_model(vae_folder):
    _, model = vae_folder
    vae = {k[len("first_stage_model."):]: v for k, v in vae_diffusers_to_ldm(numpy_state_dict(model)).items()}
    inferred = infer_vae_config(vae)
    for field in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups", "act_fn",
                  "mid_block_add_attention", "use_quant_conv"):
        assert inferred[field] == model.config[field], field
    assert tuple(inferred["block_out_channels"]) == tuple(model.config.block_out_channels)
    assert tuple(inferred["down_block_types"]) == tuple(model.config.down_block_types)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_compvis_single_file_loads_the_same_params(vae_folder, tmp_path, suffix):
    folder, model = vae_folder
    checkpoint = _full_sd_checkpoint(numpy_state_dict(model))
    path = str(tmp_path / f"sd{suffix}")
    if suffix == ".ckpt":
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in checkpoint.items()}, "global_step": 7}, path)
    else:
        save_safetensors(path, checkpoint)
    _, reference = load_vae(folder)
    module, params = load_vae(path)  # config inferred from the shapes
    assert module.config.block_out_channels == (32, 64)
    assert_same_params(params, reference)


def test_standalone_ldm_vae_file_and_config_override(tmp_path):
    model = save_tiny_vae(str(tmp_path / "diffusers"), seed=6, block_out_channels=(8, 16), norm_num_groups=4)
    path = save_safetensors(str(tmp_path / "vae-ft.safetensors"),
                            vae_diffusers_to_ldm(numpy_state_dict(model), prefix=""))
    _, reference = load_vae(str(tmp_path / "diffusers"))
    # 8 channels cannot be inferred as 32 groups: config= provides what shapes cannot tell
    module, params = load_vae(path, config=str(tmp_path / "diffusers" / "config.json"))
    assert module.config.norm_num_groups == 4
    assert_same_params(params, reference)


def test_pipeline_root_and_legacy_attention_names(vae_folder, tmp_path):
    folder, model = vae_folder
    _, reference = load_vae(folder)
    root = save_pipeline(str(tmp_path / "pipe"), vae=model)
    assert_same_params(load_vae(root)[1], reference)

    # diffusers < 0.14 files (SD v1.5's hub VAE) name the mid-block attention query/key/value/proj_attn
    legacy = {}
    for key, value in numpy_state_dict(model).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    os.makedirs(tmp_path / "legacy")
    save_safetensors(str(tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"), legacy)
    with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "legacy" / "config.json", "w") as dst:
        dst.write(src.read())
    assert_same_params(load_vae(str(tmp_path / "legacy"))[1], reference)


def test_param_dtype(vae_folder):
    folder, _ = vae_folder
    module, params = load_vae(folder, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, reference = load_vae(folder)
    x = jnp.zeros((1, 8, 8, 3))
    np.testing.assert_allclose(module.apply({"params": params}, x).mean,
                               module.apply({"params": reference}, x).mean, atol=0.05)


def test_corrupted_file_names_each_key(vae_folder, tmp_path):
    folder, model = vae_folder
    state = corrupt_state_dict(numpy_state_dict(model), misshape="encoder.conv_in.weight",
                               drop="encoder.mid_block.attentions.0.to_v.bias")
    path = save_safetensors(str(tmp_path / "broken.safetensors"), state)
    with pytest.raises(WeightLoadingError) as info:
        load_vae(path, config=os.path.join(folder, "config.json"))
    message = str(info.value)
    assert "broken.safetensors" in message
    assert [k for k, *_ in info.value.mismatched] == ["encoder.conv_in.weight"]
    assert [k for k, _ in info.value.missing] == ["encoder.mid_block.attentions.0.to_v.bias"]
    assert [k for k, _ in info.value.unexpected] == ["not_a_layer.weight"]

    # In a CompVis file the errors name the file's own keys.
    ldm = corrupt_state_dict(vae_diffusers_to_ldm(numpy_state_dict(model)),
                             misshape="first_stage_model.encoder.mid.attn_1.q.weight",
                             drop="first_stage_model.quant_conv.bias", extra="first_stage_model.encoder.bogus.weight")
    with pytest.raises(WeightLoadingError) as info:
        load_vae(save_safetensors(str(tmp_path / "broken_ldm.safetensors"), ldm))
    assert [k for k, *_ in info.value.mismatched] == ["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert [k for k, _ in info.value.missing] == ["quant_conv.bias"]
    assert [k for k, _ in info.value.unexpected] == ["first_stage_model.encoder.bogus.weight"]
