"""load_text_encoder from transformers 5 and 4.x layouts, full CLIP folders, sharded files and pipeline roots."""
import json
import os

import jax
import numpy as np
import pytest
import torch

from tests.reference_models import (assert_same_params, corrupt_state_dict, numpy_state_dict, save_pipeline,
                                    save_safetensors, save_tiny_clip, tiny_clip_config)
from vpd_jax.weights import WeightLoadingError, load_text_encoder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip"))
    return folder, save_tiny_clip(folder, seed=7)


def _write_folder(folder, config: dict, files: dict):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    for name, state in files.items():
        if name.endswith(".bin"):
            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(folder, name))
        else:
            save_safetensors(os.path.join(folder, name), state)
    return folder


def test_transformers4_layout_with_position_ids_buffer(clip_folder, tmp_path):
    folder, model = clip_folder
    state = numpy_state_dict(model)
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 drops the prefix
    legacy = {f"text_model.{k}": v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    config = json.load(open(os.path.join(folder, "config.json")))
    _, reference = load_text_encoder(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):  # safetensors, and a torch pickle read weights_only
        legacy_folder = _write_folder(str(tmp_path / name), config, {name: legacy})
        assert_same_params(load_text_encoder(legacy_folder)[1], reference)


def test_full_clip_model_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text = tiny_clip_config()
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = load_text_encoder(str(tmp_path))
    ids = np.asarray([[62, 5, 9, 63, 63], [62, 7, 63, 63, 63]])
    with torch.no_grad():
        reference = model.text_model(torch.from_numpy(ids))
    out = jax.jit(module.apply)({"params": params}, ids.astype(np.int32))
    np.testing.assert_allclose(out.pooled, reference.pooler_output.numpy(), rtol=1e-4, atol=1e-5)


def test_sharded_and_pipeline_root(clip_folder, tmp_path):
    folder, model = clip_folder
    _, reference = load_text_encoder(folder)
    model.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="20KB")
    assert any(n.endswith(".safetensors.index.json") for n in os.listdir(tmp_path / "sharded"))
    assert_same_params(load_text_encoder(str(tmp_path / "sharded"))[1], reference)
    root = save_pipeline(str(tmp_path / "pipe"), text_encoder=model)
    assert_same_params(load_text_encoder(root)[1], reference)


def test_corrupted_file_names_each_key(clip_folder, tmp_path):
    folder, model = clip_folder
    state = corrupt_state_dict(numpy_state_dict(model), misshape="encoder.layers.1.mlp.fc1.weight",
                               drop="final_layer_norm.bias")
    config = json.load(open(os.path.join(folder, "config.json")))
    broken = _write_folder(str(tmp_path / "broken"), config, {"model.safetensors": state})
    with pytest.raises(WeightLoadingError) as info:
        load_text_encoder(broken)
    assert [k for k, *_ in info.value.mismatched] == ["encoder.layers.1.mlp.fc1.weight"]  # as in the file
    assert [k for k, _ in info.value.missing] == ["text_model.final_layer_norm.bias"]
    assert [k for k, _ in info.value.unexpected] == ["not_a_layer.weight"]
    assert "model.safetensors" in str(info.value)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):
        load_text_encoder(str(tmp_path))
