"""Shared pieces of the file-based builders: bad-input policy, source trees (folder or zip), image checks."""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
from absl import logging
from PIL import Image

ON_BAD_INPUT = ("raise", "skip")


class BadInputError(ValueError):
    """A source file that cannot become a valid example; the message names the file and the problem."""


class BadInputLog:
    """Raises on the first bad input, or (policy 'skip') collects them and warns once per split.

    Skipping is never silent: `warn()` logs the count and the first few (file, problem) pairs, and `skipped`
    keeps them all for the caller.
    """

    def __init__(self, dataset: str, split: str, policy: str):
        if policy not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {policy!r}")
        self.dataset, self.split, self.policy = dataset, split, policy
        self.skipped: list[tuple[str, str]] = []

    def report(self, path: str, problem: str) -> None:
        if self.policy == "raise":
            raise BadInputError(
                f"{self.dataset} ({self.split}): {path}: {problem}. "
                "Fix or remove the file, or build with on_bad_input='skip' to skip and count such examples."
            )
        self.skipped.append((path, problem))

    def warn(self) -> None:
        if not self.skipped:
            return
        shown = "; ".join(f"{path}: {problem}" for path, problem in self.skipped[:10])
        more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
        logging.warning(
            "%s (%s): skipped %d bad example(s): %s%s", self.dataset, self.split, len(self.skipped), shown, more
        )


class SourceTree:
    """Read-only view of a dataset folder, or of a zip archive with the same layout inside.

    Paths are '/'-separated and relative to `root` (a folder, or a folder prefix inside the zip).
    """

    def __init__(self, location: str | os.PathLike, root: str = ""):
        self.location = os.fspath(location)
        self.root = root.strip("/")
        self._zip = zipfile.ZipFile(self.location) if zipfile.is_zipfile(self.location) else None
        if self._zip is None and not os.path.isdir(self.location):
            raise FileNotFoundError(f"{self.location}: neither a folder nor a zip archive")
        self._names = None if self._zip is None else set(self._zip.namelist())

    def display(self, relpath: str) -> str:
        """The path as a user would look for it (inside the zip when reading from one)."""
        inner = "/".join(p for p in (self.root, relpath) if p)
        return f"{self.location}!{inner}" if self._zip is not None else os.path.join(self.location, inner)

    def _inner(self, relpath: str) -> str:
        return "/".join(p for p in (self.root, relpath) if p)

    def exists(self, relpath: str) -> bool:
        if self._zip is None:
            return os.path.exists(os.path.join(self.location, self._inner(relpath)))
        inner = self._inner(relpath)
        return inner in self._names or any(n.startswith(inner.rstrip("/") + "/") for n in self._names)

    def list_files(self, folder: str, suffix: str) -> list[str]:
        """Sorted relative paths of the files directly in `folder` whose names end with `suffix`."""
        if self._zip is None:
            full = os.path.join(self.location, self._inner(folder))
            if not os.path.isdir(full):
                return []
            names = [n for n in os.listdir(full) if n.endswith(suffix) and os.path.isfile(os.path.join(full, n))]
            return sorted(f"{folder}/{n}" for n in names)
        prefix = self._inner(folder).rstrip("/") + "/"
        found = []
        for name in self._names:
            rest = name[len(prefix):] if name.startswith(prefix) else None
            if rest and "/" not in rest and rest.endswith(suffix):
                found.append(f"{folder}/{rest}")
        return sorted(found)

    def read_bytes(self, relpath: str) -> bytes:
        if self._zip is None:
            with open(os.path.join(self.location, self._inner(relpath)), "rb") as f:
                return f.read()
        return self._zip.read(self._inner(relpath))


def open_image(data: bytes) -> Image.Image:
    """Fully decodes `data` (so truncated files fail here, not later in the input pipeline)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def check_image(data: bytes, path: str, log: BadInputLog) -> Image.Image | None:
    """The decoded image, or None after reporting why it cannot be read."""
    try:
        return open_image(data)
    except Exception as e:  # PIL raises many types for corrupt data
        log.report(path, f"unreadable image ({type(e).__name__}: {e})")
        return None


def rgb_bytes(image: Image.Image, data: bytes) -> bytes:
    """The original file bytes for RGB/greyscale JPEG or PNG (decoded by TF as is); other modes become PNG RGB."""
    if image.mode in ("RGB", "L") and image.format in ("JPEG", "PNG"):
        return data
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of a (H, W), (H, W, 1) or (H, W, 3) uint8 array, or a (H, W[, 1]) uint16 array."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

