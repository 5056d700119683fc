"""Class-embedding recipes, the compute tool (against transformers' CLIPTextModel) and the .npy/.pth loader."""
import json

import numpy as np
import pytest
import torch

from tests.helpers.shared_data import shared_vpd_data
from vpd_jax.apps import class_embeddings as ce
from vpd_jax.weights.class_embeddings import load_class_embeddings


def test_recipe_facts():
    assert len(ce.ADE20K_CLASSES) == 150 and len(set(ce.ADE20K_CLASSES)) == 150
    assert ce.ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ce.ADE20K_CLASSES[-2:] == ("clock", "flag")
    assert len(ce.IMAGENET_TEMPLATES) == 80 and len(set(ce.IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in ce.IMAGENET_TEMPLATES)
    ade, nyu = ce.RECIPES["ade20k"], ce.RECIPES["nyu"]
    assert (ade.max_length, nyu.max_length) == (77, 20)
    assert ade.prompts("chest of drawers") == ["a photo of a chest of drawers."]
    prompts = nyu.prompts("living_room")
    assert len(prompts) == 80 and prompts[0] == "a bad photo of a living room." and prompts[-1] == "a tattoo of the living room."


def test_nyu_scene_order_is_the_released_list():
    shared = shared_vpd_data()
    assert list(ce.RECIPES["nyu"].class_names) == json.loads((shared / "nyu_class_list.json").read_text())


@pytest.mark.parametrize("name,shape,row0", [
    ("ade20k_class_embeddings.pth", (150, 768), [0.4394, -0.9911, 0.5392, 1.2122]),
    ("nyu_class_embeddings.pth", (27, 768), [-0.4888, -0.2763, -0.5693, 0.3377]),
])
def test_loads_released_pth_like_torch(name, shape, row0):
    path = shared_vpd_data() / name
    got = load_class_embeddings(path)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got[0, :4], row0, atol=5e-5)
    np.testing.assert_array_equal(got, torch.load(path, weights_only=True).numpy())


def test_loads_npy_and_rejects_bad_inputs(tmp_path):
    emb = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float64)
    np.save(tmp_path / "e.npy", emb)
    got = load_class_embeddings(tmp_path / "e.npy")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, emb, rtol=1e-6)
    np.save(tmp_path / "v.npy", emb[0])
    with pytest.raises(ValueError, match=r"v\.npy.*\(6,\)"):
        load_class_embeddings(tmp_path / "v.npy")
    with pytest.raises(ValueError, match=r"e\.txt"):
        load_class_embeddings(tmp_path / "e.txt")


def _reference_embeddings(model, tokenizer_folder, recipe):
    """transformers' CLIPTokenizer + CLIPTextModel pooler_output, mean over templates (the reference recipe)."""
    from transformers import CLIPTokenizer

    prompts = [p for name in recipe.class_names for p in recipe.prompts(name)]
    ids = CLIPTokenizer.from_pretrained(tokenizer_folder)(
        prompts, padding="max_length", truncation=True, max_length=recipe.max_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pooled = model(input_ids=ids).pooler_output.numpy()
    return pooled.reshape(len(recipe.class_names), len(recipe.templates), -1).mean(1)


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from tests.reference_models import save_tiny_clip, write_tiny_tokenizer

    folder = str(tmp_path_factory.mktemp("clip"))
    vocab = write_tiny_tokenizer(folder)
    eos = vocab["<|endoftext|>"]
    model = save_tiny_clip(folder, vocab_size=len(vocab), max_position_embeddings=77,
                           bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    return folder, model


@pytest.mark.parametrize("dataset", ["ade20k", "nyu"])
def test_tool_matches_transformers_clip(tmp_path, tiny_clip_folder, dataset):
    folder, model = tiny_clip_folder
    recipe = ce.RECIPES[dataset]
    out = tmp_path / f"{dataset}.npy"
    ce.main(["--dataset", dataset, "--text_encoder", folder, "--output", str(out), "--batch_size", "512"])
    got = load_class_embeddings(out)
    want = _reference_embeddings(model, folder, recipe)
    assert got.shape == (len(recipe.class_names), 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
