"""The torch-free, code-free reader of torch.save zip archives."""
import pickle
import zipfile

import numpy as np
import pytest
import torch

from vpd_jax.weights import torch_archive
from vpd_jax.weights.io import UnreadableWeightsError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_roundtrip_dtypes(tmp_path, dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    torch.save(t, tmp_path / "t.pth")
    got = torch_archive.load_tensor(tmp_path / "t.pth")
    want = t.float().numpy() if dtype == torch.bfloat16 else t.numpy()
    assert got.shape == (3, 5)
    np.testing.assert_array_equal(got.astype(want.dtype), want)


def test_views_offsets_shared_storage_and_containers(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {"t": base.t()[2:5], "row": base[4], "nested": [base[1:3, ::3], (base,)], "plain": 3}
    torch.save(obj, tmp_path / "views.pth")
    got = torch_archive.load(tmp_path / "views.pth")
    np.testing.assert_array_equal(got["t"], base.t()[2:5].numpy())
    np.testing.assert_array_equal(got["row"], base[4].numpy())
    np.testing.assert_array_equal(got["nested"][0], base[1:3, ::3].numpy())
    np.testing.assert_array_equal(got["nested"][1][0], base.numpy())
    assert got["plain"] == 3
    with pytest.raises(ValueError, match="expected a single tensor, found a dict"):
        torch_archive.load_tensor(tmp_path / "views.pth")


def test_state_dict(tmp_path):
    sd = torch.nn.Linear(4, 3).state_dict()
    torch.save(sd, tmp_path / "sd.pth")
    got = torch_archive.load(tmp_path / "sd.pth")
    assert list(got) == ["weight", "bias"]
    np.testing.assert_array_equal(got["weight"], sd["weight"].numpy())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _archive_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def test_rejects_code_execution_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    _archive_with_pickle(bad, payload)
    with pytest.raises(torch_archive.UnsafePickleError, match=r"evil\.pth.*'io\.open'"):
        torch_archive.load(bad)
    assert not marker.exists()
    pickle.loads(payload).close()  # the payload is live: plain unpickling does create the file
    assert marker.exists()
    for module, name in [("os", "system"), ("torch.nn.modules.linear", "Linear"), ("torch._utils", "_rebuild_parameter")]:
        payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
        _archive_with_pickle(bad, payload)
        with pytest.raises(torch_archive.UnsafePickleError, match=f"{module}.{name}"):
            torch_archive.load(bad)


def test_rejects_out_of_bounds_views_and_non_archives(tmp_path):
    t = torch.arange(6, dtype=torch.float32)
    torch.save(t, tmp_path / "t.pth")
    with zipfile.ZipFile(tmp_path / "t.pth") as z:
        files = {n: z.read(n) for n in z.namelist()}
    root = next(n for n in files if n.endswith("data.pkl")).split("/")[0]
    # shrink the raw storage record: the size check must catch it
    files[f"{root}/data/0"] = files[f"{root}/data/0"][:8]
    with zipfile.ZipFile(tmp_path / "short.pth", "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(torch_archive.UnsafePickleError, match=r"short\.pth.*8 bytes"):
        torch_archive.load(tmp_path / "short.pth")
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"legacy\.pth.*not a torch zip"):
        torch_archive.load(tmp_path / "legacy.pth")


def test_truncated_or_corrupt_archives_name_the_file(tmp_path):
    """Reading errors say what is wrong with which file, and are not called unsafe pickles."""
    torch.save(torch.arange(1000, dtype=torch.float32), tmp_path / "t.pth")
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableWeightsError, match=r"cut\.pth \([\d,]+ bytes\): not a torch zip archive: truncated"):
        torch_archive.load(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match=r"absent\.pth: no such file"):
        torch_archive.load(tmp_path / "absent.pth")
    (tmp_path / "old.pth").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(UnreadableWeightsError, match=r"old\.pth .*a legacy pre-1\.6 torch\.save file"):
        torch_archive.load(tmp_path / "old.pth")

    # Flip bytes inside the stored tensor record: the zip's CRC check fails when it is read.
    with zipfile.ZipFile(tmp_path / "t.pth") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    corrupt = bytearray(data)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    corrupt[start + 100: start + 110] = bytes(10)
    (tmp_path / "crc.pth").write_bytes(bytes(corrupt))
    with pytest.raises(UnreadableWeightsError, match=r"crc\.pth: truncated or corrupt torch archive: BadZipFile"):
        torch_archive.load(tmp_path / "crc.pth")


def test_a_refusal_inside_a_tensor_names_the_file(tmp_path):
    """BUILD state on a rebuilt tensor is refused from inside the stand-in tensor, which does not know the file."""
    t = torch.ones(2)
    torch.save(t, tmp_path / "t.pth")
    with zipfile.ZipFile(tmp_path / "t.pth") as z:
        files = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in files if n.endswith("data.pkl"))
    stop = files[name].rindex(b".")
    files[name] = files[name][:stop] + b"}b."  # BUILD with an empty dict on the tensor, then STOP
    with zipfile.ZipFile(tmp_path / "built.pth", "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(torch_archive.UnsafePickleError, match=r"built\.pth: pickle tried to set state on a tensor"):
        torch_archive.load(tmp_path / "built.pth")


def test_an_argparse_namespace_of_plain_values_reads_as_a_simple_namespace(tmp_path):
    """VPD's referring checkpoints pickle their training arguments: read without torch as plain values; a
    Namespace holding anything else (here a callable) is refused."""
    import argparse
    import types

    path = tmp_path / "refer.pth"
    args = argparse.Namespace(lr=5e-5, img_size=512, dataset="refcoco", splits=("train",), extra={"a": [1, None]})
    torch.save({"model": {"w": torch.ones(2)}, "args": args, "epoch": 3}, path)
    loaded = torch_archive.load(path)
    assert isinstance(loaded["args"], types.SimpleNamespace) and vars(loaded["args"]) == vars(args)
    np.testing.assert_array_equal(loaded["model"]["w"], np.ones(2, np.float32))
    torch.save({"args": argparse.Namespace(hook=torch.nn.Identity())}, path)
    with pytest.raises(torch_archive.UnsafePickleError, match=r"refer\.pth"):
        torch_archive.load(path)
