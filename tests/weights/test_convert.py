"""The generic strict converter: naming rule, layouts, and one error listing every problem."""
import jax
import numpy as np
import pytest

from vpd_jax.weights.convert import WeightLoadingError, convert_state_dict, torch_key_of, torch_module_path


def _target(**leaves):
    """An abstract param tree from {'a/b/kernel': shape}."""
    tree = {}
    for path, shape in leaves.items():
        node = tree
        *modules, leaf = path.split("__")
        for name in modules:
            node = node.setdefault(name, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, np.float32)
    return tree


TARGET = _target(
    down_blocks_0__resnets_1__conv1__kernel=(3, 3, 2, 4),
    down_blocks_0__resnets_1__conv1__bias=(4,),
    down_blocks_0__resnets_1__norm1__scale=(2,),
    down_blocks_0__resnets_1__norm1__bias=(2,),
    to_out_0__kernel=(4, 5),
    token_embedding__embedding=(7, 3),
    time_embedding__linear_1__kernel=(3, 6),
)


def _state(rng=np.random.default_rng(0)):
    return {
        "down_blocks.0.resnets.1.conv1.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "down_blocks.0.resnets.1.conv1.bias": rng.normal(size=(4,)).astype(np.float32),
        "down_blocks.0.resnets.1.norm1.weight": rng.normal(size=(2,)).astype(np.float32),
        "down_blocks.0.resnets.1.norm1.bias": rng.normal(size=(2,)).astype(np.float32),
        "to_out.0.weight": rng.normal(size=(5, 4)).astype(np.float32),
        "token_embedding.weight": rng.normal(size=(7, 3)).astype(np.float16),
        "time_embedding.linear_1.weight": rng.normal(size=(6, 3)).astype(np.float32),
    }


def test_naming_rule_and_layouts():
    state = _state()
    params = convert_state_dict(state, TARGET, source="test")
    conv = params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]
    np.testing.assert_array_equal(conv, state["down_blocks.0.resnets.1.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["to_out_0"]["kernel"], state["to_out.0.weight"].T)
    np.testing.assert_array_equal(params["down_blocks_0"]["resnets_1"]["norm1"]["scale"],
                                  state["down_blocks.0.resnets.1.norm1.weight"])
    embedding = params["token_embedding"]["embedding"]
    assert embedding.dtype == np.float32  # cast to the target dtype
    np.testing.assert_array_equal(embedding, state["token_embedding.weight"].astype(np.float32))
    np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["kernel"],
                                  state["time_embedding.linear_1.weight"].T)


def test_one_by_one_conv_and_linear_are_interchangeable():
    weight = np.arange(20, dtype=np.float32).reshape(5, 4)
    as_dense = convert_state_dict({"q.weight": weight[:, :, None, None]}, _target(q__kernel=(4, 5)), source="t")
    np.testing.assert_array_equal(as_dense["q"]["kernel"], weight.T)
    as_conv = convert_state_dict({"q.weight": weight}, _target(q__kernel=(1, 1, 4, 5)), source="t")
    np.testing.assert_array_equal(as_conv["q"]["kernel"][0, 0], weight.T)


def test_every_problem_is_reported_at_once():
    state = _state()
    del state["down_blocks.0.resnets.1.norm1.bias"]
    state["to_out.0.weight"] = np.zeros((5, 3), np.float32)
    state["down_blocks.0.resnets.1.conv1.weight"] = np.zeros((4, 2, 1, 1), np.float32)
    state["extra.layer.weight"] = np.zeros((2, 2), np.float32)
    state["down_blocks_0.resnets.1.norm1.weight"] = np.zeros((2,), np.float32)  # same Flax name as a real key
    with pytest.raises(WeightLoadingError) as info:
        convert_state_dict(state, TARGET, source="some/file.safetensors")
    err = info.value
    message = str(err)
    assert "some/file.safetensors" in message
    assert err.missing == [("down_blocks.0.resnets.1.norm1.bias", (2,))]
    assert sorted(err.unexpected) == [("down_blocks_0.resnets.1.norm1.weight", (2,)), ("extra.layer.weight", (2, 2))]
    assert sorted(err.mismatched) == [("down_blocks.0.resnets.1.conv1.weight", (4, 2, 1, 1), (4, 2, 3, 3)),
                                      ("to_out.0.weight", (5, 3), (5, 4))]
    for key in ("down_blocks.0.resnets.1.norm1.bias", "extra.layer.weight", "to_out.0.weight", "(5, 3)", "(5, 4)"):
        assert key in message
    assert isinstance(err, ValueError)


def test_ignore_patterns_and_key_origin():
    state = {**_state(), "decoder.conv_in.weight": np.zeros((1,)), "position_ids": np.zeros((1, 3))}
    convert_state_dict(state, TARGET, source="t", ignore=(r"decoder\.", r"position_ids$"))
    with pytest.raises(WeightLoadingError, match=r"unexpected  model\.old_name\.weight"):
        convert_state_dict({**_state(), "new.weight": np.zeros(1)}, TARGET, source="t",
                           key_origin={"new.weight": "model.old_name.weight"})


def test_name_helpers():
    assert torch_module_path("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight") == (
        ("up_blocks_1", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj"), "weight")
    assert torch_key_of(("down_blocks_2", "attentions_1", "to_out_0", "kernel")) == \
        "down_blocks.2.attentions.1.to_out.0.weight"
    assert torch_key_of(("time_embedding", "linear_2", "bias")) == "time_embedding.linear_2.bias"
    assert torch_key_of(("final_layer_norm", "scale")) == "final_layer_norm.weight"
