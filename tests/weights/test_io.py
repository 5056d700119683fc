"""Reading weights files: safetensors without torch, sharded indices, torch pickles only with weights_only; a file
that cannot be read is named with what is wrong with it."""
import builtins
import json
import os

import jax
import numpy as np
import pytest
import torch

from tests.reference_models import save_safetensors
from vpd_jax.weights.class_embeddings import load_class_embeddings
from vpd_jax.weights.convert import WeightLoadingError, convert_state_dict
from vpd_jax.weights.io import UnreadableWeightsError, UnsafePickleError, find_weights_file, read_state_dict


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


# ------------------------------------------------------------------------- unreadable files name themselves


def test_truncated_or_foreign_safetensors_name_the_file(tmp_path):
    """safetensors' own error ("Error while deserializing header: ...") names no file."""
    good = save_safetensors(str(tmp_path / "good.safetensors"), {"w": np.ones((64, 64), np.float32)})
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    other = tmp_path / "other.safetensors"
    other.write_text("<html>a download error page</html>")
    for path in (cut, other):
        with pytest.raises(UnreadableWeightsError, match=rf"{path} \([\d,]+ bytes\): not a readable safetensors "
                                                         r"file, truncated or corrupt \(safetensors: "):
            read_state_dict(str(path))
    with pytest.raises(FileNotFoundError, match=r"absent\.safetensors: no such weights file"):
        read_state_dict(str(tmp_path / "absent.safetensors"))


def test_broken_sharded_index_names_the_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{\"weight_map\": {\"x\": ")
    with pytest.raises(UnreadableWeightsError, match=r"model\.safetensors\.index\.json .*not a safetensors index"):
        read_state_dict(str(index))
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"index\.json: shard 'a\.safetensors' listed in the index is not in"):
        read_state_dict(str(index))


def test_refused_or_truncated_pickles_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"a": torch.ones(1)}, "payload": _Exploit()}, "evil.ckpt")
    with pytest.raises(UnsafePickleError, match=r"^evil\.ckpt: refused by torch\.load\(weights_only=True\)"):
        read_state_dict("evil.ckpt")
    assert not os.path.exists("pwned")
    torch.save({"a": torch.ones(1000)}, "model.ckpt")
    data = open("model.ckpt", "rb").read()
    open("cut.ckpt", "wb").write(data[: len(data) // 2])
    with pytest.raises(UnreadableWeightsError, match=r"^cut\.ckpt \([\d,]+ bytes\): not a readable PyTorch checkpoint"):
        read_state_dict("cut.ckpt")


def test_class_embeddings_errors_name_the_file(tmp_path):
    embeddings = np.ones((3, 8), np.float32)
    np.save(tmp_path / "e.npy", embeddings)
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "e.npy").read_bytes()[:100])
    with pytest.raises(UnreadableWeightsError, match=r"cut\.npy: not a readable \.npy array"):
        load_class_embeddings(cut)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnreadableWeightsError, match=r"objects\.npy: not a readable \.npy array.*allow_pickle"):
        load_class_embeddings(tmp_path / "objects.npy")
    embeddings[1, 4] = np.nan
    np.save(tmp_path / "nan.npy", embeddings)
    with pytest.raises(UnreadableWeightsError, match=r"nan\.npy: 1 NaN or infinite value\(s\), in class row\(s\) \[1"):
        load_class_embeddings(tmp_path / "nan.npy")


def test_weights_with_nan_are_refused_naming_the_file_and_key(tmp_path):
    """A NaN in a weights file would otherwise show only as a NaN loss at the first step."""
    kernel = np.ones((3, 4), np.float32)
    kernel[0, 0] = np.inf
    path = save_safetensors(str(tmp_path / "w.safetensors"), {"dense.weight": kernel, "dense.bias": np.zeros(3)})
    target = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32),
                        "bias": jax.ShapeDtypeStruct((3,), np.float32)}}
    with pytest.raises(WeightLoadingError, match=r"(?s)cannot load .*w\.safetensors: .*1 with NaN or infinite values"
                                                 r".*non-finite  dense\.weight: 1 of 12 values"):
        convert_state_dict(read_state_dict(path), target, source=path)
