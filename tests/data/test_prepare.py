"""`python -m vpd_jax.data.prepare`: one command for every builder; ADE20K straight from its zip file."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data import fixtures
from vpd_jax.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_ade20k_zip_itself_is_a_manual_dir(tmp_path):
    """The command of the README, on the zip file: the data are built and read back (the same images)."""
    expected = fixtures.write_ade20k(str(tmp_path / "download"), as_zip=True)
    zip_path = tmp_path / "download" / "ADEChallengeData2016.zip"
    done = subprocess.run([sys.executable, "-m", "vpd_jax.data.prepare", "ade20k", f"--manual_dir={zip_path}",
                           f"--data_dir={tmp_path / 'tfds'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ade20k prepared in" in done.stdout
    assert prepare.is_prepared("ade20k", str(tmp_path / "tfds"))
    builder = prepare.load_builder("ade20k", str(tmp_path / "tfds"))
    labels = {os.path.splitext(ex["file_name"].decode())[0]: ex["label"][..., 0]
              for ex in builder.as_dataset(split="validation").as_numpy_iterator()}
    assert labels.keys() == expected["validation"].keys()
    for stem, want in expected["validation"].items():
        np.testing.assert_array_equal(labels[stem], want)


def test_manual_dir_errors_name_the_path_and_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ade20k: manual_dir='.*/nowhere' does not exist"):
        prepare.manual_folder("ade20k", str(tmp_path / "nowhere"))
    other = tmp_path / "my_ade.zip"
    fixtures.write_ade20k(str(tmp_path / "d"), as_zip=True)
    os.rename(tmp_path / "d" / "ADEChallengeData2016.zip", other)
    with pytest.raises(ValueError, match="the official one is named ADEChallengeData2016.zip"):
        prepare.manual_folder("ade20k", str(other))
    with pytest.raises(NotADirectoryError, match="phrasecut: .* is a file; this dataset is read from a folder"):
        prepare.manual_folder("phrasecut", str(other))
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="neither a folder nor a zip archive"):
        prepare.manual_folder("ade20k", str(text))
    assert prepare.manual_folder("phrasecut", str(tmp_path)) == str(tmp_path)
    assert prepare.manual_folder("vpd_shapes/small", None) is None


def test_training_prepares_missing_data_from_manual_dir_and_names_the_command_without_it(tmp_path):
    from vpd_jax.run.training import prepare_data
    from vpd_jax.data.config import data_config

    data = data_config("seg", "ade20k")
    data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"ade20k is not prepared in .*python -m vpd_jax.data.prepare ade20k"):
        prepare_data(data)
    fixtures.write_ade20k(str(tmp_path / "download"), as_zip=True)
    data.manual_dir = str(tmp_path / "download" / "ADEChallengeData2016.zip")
    prepare_data(data)
    assert prepare.is_prepared("ade20k", data.data_dir)
    data.manual_dir = None
    prepare_data(data)  # prepared: nothing to do, no manual_dir needed
