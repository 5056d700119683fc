"""Read tensors from PyTorch `torch.save` zip archives without torch and without running pickled code.

A `torch.save` file is a zip holding `<root>/data.pkl` (a pickle whose tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` calls, the storages being
persistent ids `('storage', torch.<T>Storage, key, location, numel)`) and one raw little-endian record
`<root>/data/<key>` per storage. The restricted unpickler below resolves only those globals, to inert local
stand-ins, plus `collections.OrderedDict` (the empty backward-hook dict and state-dict containers) and
`argparse.Namespace` (the training arguments VPD's referring checkpoints pickle beside the weights), rebuilt as an
inert `types.SimpleNamespace` of plain values. Any other
global (`os.system`, `builtins.eval`, `torch.nn.Module`, ...) raises `UnsafePickleError` naming the file, before
anything is called; a truncated or corrupt archive raises `UnreadableWeightsError` naming it. Tensors come back as
numpy arrays.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import types
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from vpd_jax.weights.io import UnreadableWeightsError, UnsafePickleError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Refused(Exception):
    """Raised inside the unpickler; `load` turns it into an UnsafePickleError naming the file."""


class _StorageType:
    """Stand-in for a `torch.<T>Storage` class: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Tensor:
    """A rebuilt tensor inside the pickle. Refuses pickle BUILD state so nothing can be attached to it."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise _Refused("pickle tried to set state on a tensor")


class _Namespace:
    """Stand-in for `argparse.Namespace`: takes only a dict of plain values (pickle's BUILD), nothing callable."""

    __slots__ = ("values",)

    def __init__(self):
        self.values: dict[str, Any] = {}

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) and _plain(v) for k, v in state.items()):
            raise _Refused("an argparse.Namespace holding something other than plain values")
        self.values = dict(state)


def _plain(value: Any) -> bool:
    """None, a bool, number or string, or a list / tuple / dict of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._storages: dict[str, np.ndarray] = {}
        self._little_endian = self._byteorder() == "little"

    def _byteorder(self) -> str:
        name = f"{self._root}/byteorder"
        if name not in self._archive.namelist():
            return "little"  # torch < 1.13 wrote no byteorder record and only little-endian data
        return self._archive.read(name).decode().strip()

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return _Namespace
        raise _Refused(f"refusing to load global '{module}.{name}': only tensors (torch._utils._rebuild_tensor_v2, "
                         f"torch.*Storage), collections.OrderedDict and argparse.Namespace are allowed")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused(f"unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            record = f"{self._root}/data/{key}"
            try:
                raw = self._archive.read(record)
            except KeyError:
                raise _Refused(f"missing storage record {record!r}") from None
            dtype = storage_type.dtype.newbyteorder("<" if self._little_endian else ">")
            if len(raw) != numel * dtype.itemsize:
                raise _Refused(f"storage {key!r} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
        return self._storages[key]

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        if not isinstance(storage, np.ndarray):
            raise _Refused(f"tensor rebuilt from a non-storage {type(storage).__name__}")
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in size + stride)):
            raise _Refused(f"malformed tensor record offset={offset!r} size={size!r} stride={stride!r}")
        if math.prod(size) == 0:
            return _Tensor(np.zeros(size, storage.dtype))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or last >= storage.size:
            raise _Refused(f"tensor size={size} stride={stride} offset={offset} overruns a storage of "
                             f"{storage.size} elements")
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=[s * storage.itemsize for s in stride], writeable=False)
        return _Tensor(np.array(view))


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, _Namespace):
        return types.SimpleNamespace(**obj.values)
    if isinstance(obj, dict):
        return type(obj)((k, _unwrap(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    return obj


_PICKLE_PROTOCOL_2 = b"\x80\x02"  # how a legacy (pre-1.6) torch.save file starts


def load(path: str | os.PathLike) -> Any:
    """The object saved with `torch.save` at `path`, tensors as numpy arrays (zip format, torch >= 1.6)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(2) == _PICKLE_PROTOCOL_2
        raise UnreadableWeightsError(
            f"{path} ({os.path.getsize(path):,} bytes): " + (
                "a legacy pre-1.6 torch.save file, which is not supported (re-save it with torch >= 1.6)" if legacy
                else "not a torch zip archive: truncated (no zip directory at its end) or not a torch.save file"))
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UnreadableWeightsError(f"{path}: expected one '<root>/data.pkl' in the archive, found {pickles}")
            root = pickles[0].split("/")[0]
            return _unwrap(_RestrictedUnpickler(archive.read(pickles[0]), archive, root).load())
    except _Refused as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except UnreadableWeightsError:
        raise
    except Exception as e:  # truncated or corrupt members (CRC, zlib), malformed pickles: name the file
        raise UnreadableWeightsError(f"{path}: truncated or corrupt torch archive: {type(e).__name__}: {e}") from e


def load_tensor(path: str | os.PathLike) -> np.ndarray:
    """The single tensor saved at `path` (e.g. VPD's class-embedding buffers)."""
    obj = load(path)
    if not isinstance(obj, np.ndarray):
        raise UnreadableWeightsError(f"{os.fspath(path)}: expected a single tensor, found a {type(obj).__name__}")
    return obj
