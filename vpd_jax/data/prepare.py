"""Build a dataset's TFRecords once from the files you downloaded:

  python -m vpd_jax.data.prepare NAME --manual_dir=PATH [--data_dir=DIR] [--on_bad_input=raise|skip]

NAME is a TFDS name as the configs' `data.name` holds it, and PATH what its builder reads (docs/datasets.md says
where each file comes from):
  ade20k                 ADEChallengeData2016.zip itself, the folder it extracts to, or a folder holding either
  nyu_depth_v2_bts       a folder with sync/ (BTS' sync.zip extracted), official_splits/test/ and the split lists
  phrasecut              the VGPhraseCut_v0 folder (refer_*.json and images/), or a folder holding it
  ref_coco/<config>      TFDS' own builder: the folder its instructions name (RefCOCO annotations + COCO train2014)
  vpd_shapes/<config>    nothing: rendered (no --manual_dir)
Preparing is a no-op when the data exist. train.py prepares on its own when `data.manual_dir` is given and the data
are missing; eval.py and predict.py never prepare.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from typing import Sequence

import tensorflow_datasets as tfds

from vpd_jax.data.config import family

# Our builders with a bad-input policy (vpd_jax/data/builders/common.py): 'raise' or 'skip' a broken file.
POLICY_BUILDERS = ("ade20k", "nyu_depth_v2_bts", "phrasecut")
# Datasets that ship as one archive our builder reads without extracting: its file name, which the builder looks
# for in the manual directory.
ARCHIVES = {"ade20k": "ADEChallengeData2016.zip"}


def load_builder(name: str, data_dir: str | None = None, on_bad_input: str = "raise") -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` (ours are registered by importing vpd_jax.data.builders)."""
    import vpd_jax.data.builders  # noqa: F401  (registers ade20k, nyu_depth_v2_bts, phrasecut, vpd_shapes)

    kwargs = {"on_bad_input": on_bad_input} if family(name) in POLICY_BUILDERS else {}
    return tfds.builder(name, data_dir=data_dir, **kwargs)


def manual_folder(name: str, manual_dir: str | None) -> str | None:
    """The folder TFDS is given as its manual directory for `manual_dir`: the folder itself, or the one holding the
    dataset's archive when `manual_dir` is that archive. Errors name the path and what was expected."""
    if manual_dir is None:
        return None
    path = os.path.abspath(os.path.expanduser(manual_dir))
    if os.path.isdir(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: manual_dir={manual_dir!r} does not exist")
    archive = ARCHIVES.get(family(name))
    if archive is None:
        raise NotADirectoryError(f"{name}: manual_dir={manual_dir!r} is a file; this dataset is read from a folder "
                                 "(python -m vpd_jax.data.prepare --help lists what each dataset needs)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{name}: manual_dir={manual_dir!r} is neither a folder nor a zip archive")
    if os.path.basename(path) != archive:
        raise ValueError(f"{name}: manual_dir={manual_dir!r} is a zip archive, but the official one is named "
                         f"{archive}: rename it so, or give the folder it extracts to")
    return os.path.dirname(path)


def prepare_dataset(name: str, manual_dir: str | None = None, data_dir: str | None = None,
                    on_bad_input: str = "raise") -> tfds.core.DatasetBuilder:
    """Builds `name` into `data_dir` from `manual_dir` (a no-op when it is built); returns its builder."""
    builder = load_builder(name, data_dir, on_bad_input)
    folder = manual_folder(name, manual_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
    return builder


def is_prepared(name: str, data_dir: str | None = None) -> bool:
    """Whether the TFRecords of `name` exist in `data_dir` (TFDS' default when None)."""
    return load_builder(name, data_dir).is_prepared()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpd_jax.data.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("name", help="TFDS name, e.g. ade20k, nyu_depth_v2_bts, phrasecut, ref_coco/refcoco_unc")
    parser.add_argument("--manual_dir", default=None, help="the downloaded files (see below)")
    parser.add_argument("--data_dir", default=None, help="where the TFRecords go (TFDS' default if not given)")
    parser.add_argument("--on_bad_input", choices=("raise", "skip"), default="raise",
                        help="a broken file in the download: stop naming it, or skip it (logged)")
    args = parser.parse_args(argv)
    builder = prepare_dataset(args.name, args.manual_dir, args.data_dir, args.on_bad_input)
    splits = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f"{args.name} prepared in {builder.data_dir}: {splits}")


if __name__ == "__main__":
    main()
