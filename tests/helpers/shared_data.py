"""Where the tests find VPD's released files (class embeddings, NYU scene list and split lists): too large, or not
ours, to commit; developers have them in `shared/data/vpd` beside the checkout.

A test that needs them calls `shared_vpd_data()`: without the folder it is skipped with the reason shown in the
summary (-rfEs in pyproject.toml), except under CI=true, where a missing folder fails the test: a CI
machine is meant to have it, and a silent skip there would hide that the released files were never checked.
VPD_SHARED_DATA=/path/to/vpd points the tests at another copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vpd"


def shared_vpd_data() -> Path:
    """The shared VPD data folder; skips the calling test (fails it under CI=true) when it is absent."""
    folder = Path(os.environ.get("VPD_SHARED_DATA") or DEFAULT)
    if folder.is_dir():
        return folder
    message = f"{folder} is not present (set VPD_SHARED_DATA to the folder with VPD's released files)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)
