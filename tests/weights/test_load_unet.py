"""load_unet from diffusers folders (SD v1 and v2 style), sharded files, pipeline roots and CompVis single files."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference_models import (assert_same_params, corrupt_state_dict, max_rel_diff, numpy_state_dict,
                                    save_pipeline, save_safetensors, save_tiny_unet, unet_diffusers_to_ldm)
from vpd_jax.weights import WeightLoadingError, load_unet
from vpd_jax.weights.ldm import infer_unet_config

CONFIGS = {
    # conv 1x1 proj_in/proj_out, one head count for every block
    "sd1": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                cross_attention_dim=16, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # linear proj_in/proj_out, per-block heads, upcast attention, three levels, two layers per block
    "sd2": dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=(2, 4, 4),
                cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unet_folder(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"unet_{request.param}"))
    model = save_tiny_unet(folder, CONFIGS[request.param], seed=11)
    return folder, model


def _full_sd_checkpoint(unet_state, layers_per_block):
    """A CompVis SD file: the UNet under model.diffusion_model., plus parts the UNet loader must not read."""
    return {
        **unet_diffusers_to_ldm(unet_state, layers_per_block),
        "first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32),
        "model_ema.decay": np.asarray(0.9999, np.float32),
        "betas": np.linspace(1e-4, 2e-2, 10).astype(np.float32),
    }


def test_test_mapping_agrees_with_diffusers_converter(unet_folder):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    _, model = unet_folder
    state = numpy_state_dict(model)
    ldm = unet_diffusers_to_ldm(state, model.config.layers_per_block)
    back = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, dict(model.config))
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)


@pytest.mark.slow
def test_loaded_unet_matches_torch(unet_folder):
    folder, model = unet_folder
    if not model.config.use_linear_projection:  # one config keeps the suite fast; both layouts meet below
        pytest.skip("conv-projection parity through load_unet is covered by tests/models/test_unet.py")
    module, params = load_unet(folder)
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    context = rng.normal(size=(2, 3, model.config.cross_attention_dim)).astype(np.float32)
    timesteps = np.asarray([1, 500])
    with torch.no_grad():
        reference = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)),
                                 jnp.asarray(timesteps), jnp.asarray(context))
    assert max_rel_diff(ours.sample, reference.numpy().transpose(0, 2, 3, 1)) <= 1e-4


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_compvis_single_file_loads_the_same_params(unet_folder, tmp_path, suffix):
    folder, model = unet_folder
    checkpoint = _full_sd_checkpoint(numpy_state_dict(model), model.config.layers_per_block)
    path = str(tmp_path / f"sd{suffix}")
    if suffix == ".ckpt":
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in checkpoint.items()}}, path)
    else:
        save_safetensors(path, checkpoint)
    _, reference = load_unet(folder)
    # tiny models have head counts that shapes cannot tell: config= supplies them
    _, params = load_unet(path, config=os.path.join(folder, "config.json"))
    assert_same_params(params, reference)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_config_inferred_from_a_compvis_file(tmp_path, family):
    heads = 8 if family == "sd1" else (1, 2)  # SD v1: 8 heads; SD v2: 64 channels per head
    config = dict(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
                  cross_attention_dim=768 if family == "sd1" else 1024, attention_head_dim=heads,
                  use_linear_projection=family == "sd2",
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    model = save_tiny_unet(str(tmp_path / "diffusers"), config, seed=12)
    ldm = unet_diffusers_to_ldm(numpy_state_dict(model), 1, prefix="")
    inferred = infer_unet_config(ldm)
    for field in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                  "norm_num_groups", "flip_sin_to_cos", "freq_shift", "upcast_attention", "mid_block_type"):
        assert inferred[field] == model.config[field], field
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        assert tuple(inferred[field]) == tuple(model.config[field]), field
    assert inferred["attention_head_dim"] == (8 if family == "sd1" else [1, 2])

    path = save_safetensors(str(tmp_path / "sd.safetensors"), _full_sd_checkpoint(numpy_state_dict(model), 1))
    _, reference = load_unet(str(tmp_path / "diffusers"))
    assert_same_params(load_unet(path)[1], reference)


def test_unknown_context_width_asks_for_config(unet_folder, tmp_path):
    folder, model = unet_folder
    path = save_safetensors(str(tmp_path / "sd.safetensors"),
                            _full_sd_checkpoint(numpy_state_dict(model), model.config.layers_per_block))
    with pytest.raises(ValueError, match="cross_attention_dim=.*config="):
        load_unet(path)


def test_sharded_folder_and_pipeline_root(unet_folder, tmp_path):
    folder, model = unet_folder
    _, reference = load_unet(folder)
    model.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="50KB")
    assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    assert_same_params(load_unet(str(tmp_path / "sharded"))[1], reference)
    root = save_pipeline(str(tmp_path / "pipe"), unet=model)
    assert_same_params(load_unet(root)[1], reference)


def test_corrupted_file_names_each_key(unet_folder, tmp_path):
    folder, model = unet_folder
    config = os.path.join(folder, "config.json")
    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    state = corrupt_state_dict(numpy_state_dict(model), misshape=f"{attn}.attn2.to_k.weight",
                               drop="time_embedding.linear_2.bias")
    path = save_safetensors(str(tmp_path / "broken.safetensors"), state)
    with pytest.raises(WeightLoadingError) as info:
        load_unet(path, config=config)
    assert [k for k, *_ in info.value.mismatched] == [f"{attn}.attn2.to_k.weight"]
    assert [k for k, _ in info.value.missing] == ["time_embedding.linear_2.bias"]
    assert [k for k, _ in info.value.unexpected] == ["not_a_layer.weight"]
    for key in (f"{attn}.attn2.to_k.weight", "time_embedding.linear_2.bias", "not_a_layer.weight", "broken"):
        assert key in str(info.value), key

    # CompVis layout: mis-shaped and unexpected keys are named as in the file
    ldm = corrupt_state_dict(_full_sd_checkpoint(numpy_state_dict(model), model.config.layers_per_block),
                             misshape="model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                             drop="model.diffusion_model.out.2.bias",
                             extra="model.diffusion_model.label_emb.0.0.weight")  # a class-conditioned UNet
    with pytest.raises(WeightLoadingError) as info:
        load_unet(save_safetensors(str(tmp_path / "broken_ldm.safetensors"), ldm), config=config)
    assert [k for k, *_ in info.value.mismatched] == ["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert [k for k, _ in info.value.missing] == ["conv_out.bias"]
    assert [k for k, _ in info.value.unexpected] == ["model.diffusion_model.label_emb.0.0.weight"]


def test_config_override_from_dict(unet_folder):
    folder, _ = unet_folder
    config = json.load(open(os.path.join(folder, "config.json")))
    module, _ = load_unet(folder, config={**config, "norm_eps": 1e-6})
    assert module.config.norm_eps == 1e-6


def _training_checkpoint(trained, ema, layers_per_block):
    """A CompVis training checkpoint (sd-v1-4-full-ema.ckpt's layout): the trained UNet under model.diffusion_model.,
    its EMA copy under model_ema. with the dots of each name removed (LitEma), plus the EMA's counters."""
    checkpoint = _full_sd_checkpoint(trained, layers_per_block)
    for key, value in unet_diffusers_to_ldm(ema, layers_per_block, prefix="").items():
        checkpoint["model_ema.diffusion_model" + key.replace(".", "")] = value
    checkpoint["model_ema.num_updates"] = np.asarray(470000, np.int32)
    return checkpoint


def test_compvis_unet_picks_the_trained_or_the_ema_weights_of_a_training_checkpoint(unet_folder, tmp_path):
    folder, model = unet_folder
    family = "sd1" if model.config.layers_per_block == 1 else "sd2"
    ema_model = save_tiny_unet(str(tmp_path / "ema"), CONFIGS[family], seed=12)  # other weights, same shapes
    checkpoint = _training_checkpoint(numpy_state_dict(model), numpy_state_dict(ema_model),
                                      model.config.layers_per_block)
    path = save_safetensors(str(tmp_path / "sd-full-ema.safetensors"), checkpoint)
    config = os.path.join(folder, "config.json")
    assert_same_params(load_unet(path, config=config)[1], load_unet(folder)[1])  # default: model.diffusion_model.
    assert_same_params(load_unet(path, config=config, compvis_unet="model_ema")[1], load_unet(str(tmp_path / "ema"))[1])

    del checkpoint["model_ema.diffusion_modelout2bias"]
    broken = save_safetensors(str(tmp_path / "broken.safetensors"), checkpoint)
    with pytest.raises(ValueError, match=r"broken.safetensors: the EMA copy does not match.*diffusion_modelout2bias"):
        load_unet(broken, config=config, compvis_unet="model_ema")


def test_compvis_unet_ema_needs_a_file_with_both_copies(unet_folder, tmp_path):
    folder, model = unet_folder
    config = os.path.join(folder, "config.json")
    emaonly = save_safetensors(str(tmp_path / "emaonly.safetensors"),
                               _full_sd_checkpoint(numpy_state_dict(model), model.config.layers_per_block))
    with pytest.raises(ValueError, match=r"emaonly.safetensors: no EMA copy of the UNet"):
        load_unet(emaonly, config=config, compvis_unet="model_ema")
    with pytest.raises(ValueError, match=r"a diffusers folder holds one UNet"):
        load_unet(folder, compvis_unet="model_ema")
    with pytest.raises(ValueError, match=r"compvis_unet must be one of \('model', 'model_ema'\)"):
        load_unet(folder, compvis_unet="ema")


def test_a_corrupt_config_json_is_named(unet_folder, tmp_path):
    import shutil

    from vpd_jax.weights.io import UnreadableWeightsError

    folder = tmp_path / "unet"
    shutil.copytree(unet_folder[0], folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UnreadableWeightsError, match=r"unet/config\.json: not a readable JSON model config"):
        load_unet(str(folder))
