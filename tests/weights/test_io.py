"""Reading weights files: safetensors without torch, sharded indices, torch pickles only with weights_only."""
import builtins
import json
import os

import numpy as np
import pytest
import torch

from tests.reference_models import save_safetensors
from vpd_jax.weights.io import find_weights_file, read_state_dict


def test_bfloat16_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    save_file({"w": tensor}, str(tmp_path / "bf16.safetensors"))
    state = read_state_dict(str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(state["w"].astype(np.float32), tensor.float().numpy())


def test_sharded_index_is_checked(tmp_path):
    save_safetensors(str(tmp_path / "a.safetensors"), {"x": np.ones(2, np.float32)})
    save_safetensors(str(tmp_path / "b.safetensors"), {"y": np.zeros(3, np.float32)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    assert sorted(read_state_dict(str(index))) == ["x", "y"]
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}}))
    with pytest.raises(ValueError, match=r"\['z'\]"):
        read_state_dict(str(index))


def test_ckpt_through_weights_only(tmp_path):
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"a.weight": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.bfloat16)},
                "global_step": 10, "epoch": 1}, path)
    state = read_state_dict(path)
    assert sorted(state) == ["a.weight", "b"]
    assert state["b"].dtype == np.float32


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"a": torch.ones(1)}, "payload": _Exploit()}, "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        read_state_dict("evil.ckpt")
    assert not os.path.exists("pwned")


def test_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    path = str(tmp_path / "model.ckpt")
    torch.save({"a": torch.ones(1)}, path)
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="safetensors") as info:
        read_state_dict(path)
    assert "weights_only=True" in str(info.value) and "model.safetensors" in str(info.value)


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unknown weights format"):
        read_state_dict(str(tmp_path / "weights.npz"))


def test_find_weights_file_prefers_the_standard_name(tmp_path):
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "config.json"):
        (tmp_path / name).write_text("")
    assert find_weights_file(str(tmp_path)).endswith("/diffusion_pytorch_model.safetensors")
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    assert find_weights_file(str(tmp_path)).endswith("fp16.safetensors")
    (tmp_path / "other.safetensors").write_text("")
    with pytest.raises(ValueError, match="several weights files"):
        find_weights_file(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("")
    assert find_weights_file(str(tmp_path)).endswith("model.safetensors.index.json")
