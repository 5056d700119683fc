"""ADE20K-150 (SceneParsing, `ADEChallengeData2016`) as a TFDS builder.

TFDS' own `scene_parse150` ships the instance-challenge annotation, not the 150-class semantic maps VPD is
trained and scored on (docs/datasets.md), hence this builder. Labels are stored raw (0 = other, 1..150);
reduce_zero_label happens in the augmentation (docs/reference.md, "Segmentation training data").
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from vpd_jax.data.builders import common

NUM_RAW_LABELS = 151  # 0 = other, 1..150 the classes
_SPLIT_FOLDERS = {"train": "training", "validation": "validation"}


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADEChallengeData2016: 20,210 training and 2,000 validation images with 150-class semantic labels."""

    name = "ade20k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images and raw single-channel labels of ADEChallengeData2016."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put `ADEChallengeData2016.zip` (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) or
    the folder it extracts to (`ADEChallengeData2016/` with `images/{training,validation}/*.jpg` and
    `annotations/{training,validation}/*.png`) in the manual directory.
    """

    def __init__(self, *, on_bad_input: str = "raise", **kwargs):
        self._on_bad_input = on_bad_input
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ADE20K SceneParsing (150 classes); label 0 is 'other', 1..150 are the classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://sceneparsing.csail.mit.edu/",
        )

    def _split_generators(self, dl_manager):
        tree = find_source(dl_manager.manual_dir)
        return {split: self._generate_examples(tree, split) for split in _SPLIT_FOLDERS}

    def _generate_examples(self, tree: common.SourceTree, split: str):
        log = common.BadInputLog(self.name, split, self._on_bad_input)
        folder = _SPLIT_FOLDERS[split]
        images = {_stem(p): p for p in tree.list_files(f"images/{folder}", ".jpg")}
        labels = {_stem(p): p for p in tree.list_files(f"annotations/{folder}", ".png")}
        if not images:
            raise common.BadInputError(f"{self.name} ({split}): no images in {tree.display(f'images/{folder}')}")
        for stem in sorted(labels.keys() - images.keys()):
            log.report(tree.display(labels[stem]), f"annotation without an image (expected images/{folder}/{stem}.jpg)")
        for stem in sorted(images):
            if stem not in labels:
                log.report(tree.display(f"annotations/{folder}/{stem}.png"), "file is missing (the image exists)")
                continue
            example = _example(tree, images[stem], labels[stem], log)
            if example is not None:
                yield stem, example
        log.warn()


def find_source(manual_dir: os.PathLike | str) -> common.SourceTree:
    """The dataset root inside `manual_dir`: the extracted folder, the official zip, or manual_dir itself."""
    manual_dir = os.fspath(manual_dir)
    candidates = [
        (os.path.join(manual_dir, "ADEChallengeData2016"), ""),
        (os.path.join(manual_dir, "ADEChallengeData2016.zip"), "ADEChallengeData2016"),
        (manual_dir, ""),
    ]
    for location, root in candidates:
        if os.path.exists(location):
            tree = common.SourceTree(location, root)
            if tree.exists("images") and tree.exists("annotations"):
                return tree
    raise FileNotFoundError(
        f"ade20k: no ADEChallengeData2016 folder or zip (with images/ and annotations/) in {manual_dir}"
    )


def _stem(relpath: str) -> str:
    return os.path.splitext(relpath.rsplit("/", 1)[-1])[0]


def _example(tree: common.SourceTree, image_path: str, label_path: str, log: common.BadInputLog):
    image_bytes = tree.read_bytes(image_path)
    image = common.check_image(image_bytes, tree.display(image_path), log)
    if image is None:
        return None
    label_bytes = tree.read_bytes(label_path)
    label = common.check_image(label_bytes, tree.display(label_path), log)
    if label is None:
        return None
    if label.mode not in ("L", "P", "I", "I;16"):
        log.report(tree.display(label_path), f"label must be single-channel, got PIL mode {label.mode}")
        return None
    if label.size != image.size:
        log.report(
            tree.display(label_path),
            f"label size {label.size[0]}x{label.size[1]} differs from image size {image.size[0]}x{image.size[1]}",
        )
        return None
    values = np.asarray(label)
    if values.max() >= NUM_RAW_LABELS:
        log.report(tree.display(label_path), f"label values out of range 0..{NUM_RAW_LABELS - 1}: max {values.max()}")
        return None
    # A palette or 16-bit PNG would decode to the wrong values as a 1-channel uint8 image: store the indices.
    encoded_label = label_bytes if label.mode == "L" else common.png_bytes(values.astype(np.uint8))
    return {
        "image": common.rgb_bytes(image, image_bytes),
        "label": encoded_label,
        "file_name": image_path.rsplit("/", 1)[-1],
    }
