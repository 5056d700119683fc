"""CLIP text encoder parity with transformers' CLIPTextModel, through save_pretrained -> load_text_encoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference_models import max_rel_diff, save_tiny_clip
from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, eos_positions
from vpd_jax.weights import load_text_encoder

TOLERANCE = 1e-4


def _token_batch(vocab_size, length, eos, pad, bos):
    """Three SD-style sequences: BOS, words, EOS, then padding (which may repeat EOS), of different lengths."""
    rng = np.random.default_rng(0)
    rows = []
    for words in (3, length - 2, 0):
        ids = [bos, *rng.integers(1, min(bos, eos) - 1, words), eos]
        rows.append(ids + [pad] * (length - len(ids)))
    return np.asarray(rows, np.int64)


def _run_both(folder, model, input_ids):
    with torch.no_grad():
        reference = model(torch.from_numpy(input_ids))
    module, params = load_text_encoder(folder)
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(input_ids, jnp.int32))
    return ours, reference.last_hidden_state.numpy(), reference.pooler_output.numpy()


@pytest.mark.parametrize("config, pad, embedding_scale", [
    # SD v1: quick_gelu, padding with EOS itself (first-EOS rule must not pick a padding position)
    (dict(hidden_act="quick_gelu", eos_token_id=63), 63, 1.0),
    # SD v2 / OpenCLIP: exact gelu, padding with token 0 ('!'), another width, depth and head count; tiny
    # embeddings make the first LayerNorm's variance ~1e-8, so layer_norm_eps from the config must be used
    (dict(hidden_act="gelu", eos_token_id=63, hidden_size=48, num_attention_heads=3, num_hidden_layers=3,
          layer_norm_eps=1e-6), 0, 1e-4),
    # legacy config (eos_token_id == 2): pooled at argmax(input_ids), EOS being the largest id
    (dict(hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1), 63, 1.0),
])
def test_outputs_match_transformers(tmp_path, config, pad, embedding_scale):
    model = save_tiny_clip(str(tmp_path), seed=3, **config)
    with torch.no_grad():
        model.embeddings.token_embedding.weight.mul_(embedding_scale)
        model.embeddings.position_embedding.weight.mul_(embedding_scale)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    eos = 63  # the tokenizer's EOS; with the legacy config the model's eos_token_id (2) is not it
    input_ids = _token_batch(64, 12, eos=eos, pad=pad, bos=62)
    ours, hidden, pooled = _run_both(str(tmp_path), model, input_ids)
    assert max_rel_diff(ours.last_hidden_state, hidden) <= TOLERANCE
    assert max_rel_diff(ours.pooled, pooled) <= TOLERANCE


def test_pooled_rules_differ_where_transformers_differs():
    ids = jnp.asarray([[62, 5, 63, 63, 63], [62, 63, 7, 9, 63]], jnp.int32)
    np.testing.assert_array_equal(eos_positions(ids, 63), [2, 1])  # first EOS
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 1])  # argmax: first maximum
    ids = jnp.asarray([[49406, 5, 49407, 0, 0]], jnp.int32)  # SD v2 pads with '!' (id 0)
    np.testing.assert_array_equal(eos_positions(ids, 49407), [2])
    ids = jnp.asarray([[3, 5, 4, 60, 2]], jnp.int32)
    np.testing.assert_array_equal(eos_positions(ids, 2), [3])  # legacy: largest id, not the id 2
    np.testing.assert_array_equal(eos_positions(ids, 4), [2])


def test_causal_attention_ignores_later_tokens(tmp_path):
    model = save_tiny_clip(str(tmp_path), seed=4)
    module, params = load_text_encoder(str(tmp_path))
    a = jnp.asarray([[62, 1, 2, 3, 63, 63]], jnp.int32)
    b = a.at[0, 4:].set(jnp.asarray([7, 8]))
    apply = jax.jit(module.apply)
    out_a, out_b = (apply({"params": params}, ids).last_hidden_state for ids in (a, b))
    np.testing.assert_allclose(out_a[:, :4], out_b[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out_a[:, 4:], out_b[:, 4:])


def test_param_tree_uses_transformers_names():
    module = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=16))
    params = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs(2))["params"]
    text = params["text_model"]
    assert set(text) == {"embeddings", "encoder", "final_layer_norm"}
    assert text["embeddings"]["token_embedding"]["embedding"].value.shape == (64, 32)
    assert text["embeddings"]["position_embedding"]["embedding"].value.shape == (16, 32)
    assert set(text["encoder"]) == {"layers_0", "layers_1"}
    assert set(text["encoder"]["layers_0"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert set(text["encoder"]["layers_0"]["self_attn"]["q_proj"]) == {"kernel", "bias"}
    assert set(text["encoder"]["layers_0"]["mlp"]) == {"fc1", "fc2"}


def test_config_parsing():
    full_clip = {"model_type": "clip", "text_config": {"model_type": "clip_text_model", "hidden_size": 32,
                                                        "num_attention_heads": 4, "hidden_act": "gelu",
                                                        "eos_token_id": 2, "num_beams": 1}}
    config = CLIPTextConfig.from_dict(full_clip)
    assert (config.hidden_size, config.hidden_act, config.eos_token_id) == (32, "gelu", 2)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type"):
        CLIPTextConfig.from_dict({"model_type": "t5"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        CLIPTextConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})


def test_rejects_sequences_longer_than_the_position_table():
    module = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, max_position_embeddings=8))
    with pytest.raises(ValueError, match="length <= 8"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
