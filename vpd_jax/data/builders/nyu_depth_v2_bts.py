"""NYUv2 depth in the BTS / GLPDepth layout (the split VPD trains and tests on;
docs/reference.md, "Depth training data").

Layout of the manual directory:
  sync/<scene>/rgb_XXXXX.jpg, sync/<scene>/sync_depth_XXXXX.png               training (24,231 listed pairs)
  official_splits/test/<scene>/rgb_XXXXX.jpg, .../sync_depth_XXXXX.png         official test (654 pairs)
  nyu_train_list.txt, nyu_test_list.txt                                         split lists
A split list has one pair per line, `<rgb path> <depth path>` relative to its data folder (a leading '/' is
allowed, as in VPD's lists; a third column such as BTS' focal length is ignored). Depth PNGs are uint16
millimetres (0 = no measurement); they are stored as is and converted to metres in the pipeline.
TFDS' `nyu_depth_v2` (47k raw frames, float16 metres) is a different set; the pipelines read both.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from vpd_jax.data.builders import common
from vpd_jax.data.class_names import NYU_SCENE_CLASSES, nyu_scene_class_id

IMAGE_SHAPE = (480, 640)
_SPLITS = {"train": ("sync", "nyu_train_list.txt"), "test": ("official_splits/test", "nyu_test_list.txt")}
_DEPTH_MODES = ("I;16", "I;16B", "I")


class NyuDepthV2Bts(tfds.core.GeneratorBasedBuilder):
    """NYUv2 RGB + depth (mm) with the scene name and VPD's scene class per image."""

    name = "nyu_depth_v2_bts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "BTS sync training split and official test split, depth in millimetres."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Prepare the BTS/GLPDepth NYUv2 data: `sync/` (BTS' sync.zip) and `official_splits/test/` (extracted from
    nyu_depth_v2_labeled.mat), plus the split lists `nyu_train_list.txt` and `nyu_test_list.txt`, all in the
    manual directory (or pass `train_list=` / `test_list=` paths to the builder).
    """

    def __init__(self, *, on_bad_input: str = "raise", train_list: str | None = None,
                 test_list: str | None = None, **kwargs):
        self._on_bad_input = on_bad_input
        self._lists = {"train": train_list, "test": test_list}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="NYUv2 depth, BTS sync train / official test; depth uint16 millimetres, 0 = invalid.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(*IMAGE_SHAPE, 3), encoding_format="jpeg"),
                "depth": tfds.features.Image(shape=(*IMAGE_SHAPE, 1), dtype=np.uint16, encoding_format="png"),
                "scene": tfds.features.Text(),  # the scene folder, e.g. kitchen_0028b
                "scene_class": tfds.features.ClassLabel(names=NYU_SCENE_CLASSES),
                "file_name": tfds.features.Text(),  # VPD's <scene folder>_<file>, e.g. kitchen_0028b_rgb_00045.jpg
            }),
            supervised_keys=("image", "depth"),
            homepage="https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html",
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        generators = {}
        for split, (folder, default_list) in _SPLITS.items():
            list_path = self._lists[split] or os.path.join(manual_dir, default_list)
            if not os.path.isfile(list_path):
                raise FileNotFoundError(f"{self.name} ({split}): split list {list_path} does not exist")
            generators[split] = self._generate_examples(split, common.SourceTree(manual_dir, folder), list_path)
        return generators

    def _generate_examples(self, split: str, tree: common.SourceTree, list_path: str):
        log = common.BadInputLog(self.name, split, self._on_bad_input)
        for line_number, rgb_path, depth_path in read_split_list(list_path):
            where = f"(listed in {list_path}:{line_number})"
            missing = [p for p in (rgb_path, depth_path) if not tree.exists(p)]
            if missing:
                log.report(tree.display(missing[0]), f"file is missing {where}")
                continue
            example = _example(tree, rgb_path, depth_path, log)
            if example is not None:
                yield rgb_path, example
        log.warn()


def read_split_list(path: str):
    """(line number, rgb path, depth path) per non-empty line; paths relative, without a leading '/'."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise common.BadInputError(f"{path}:{number}: expected '<rgb path> <depth path>', got {line.strip()!r}")
            yield number, fields[0].lstrip("/"), fields[1].lstrip("/")


def _example(tree: common.SourceTree, rgb_path: str, depth_path: str, log: common.BadInputLog):
    scene, file = rgb_path.split("/")[-2:] if "/" in rgb_path else ("", rgb_path)
    file_name = f"{scene}_{file}"
    try:
        scene_class = nyu_scene_class_id(file_name)
    except ValueError as e:
        log.report(tree.display(rgb_path), str(e))
        return None
    rgb_bytes = tree.read_bytes(rgb_path)
    image = common.check_image(rgb_bytes, tree.display(rgb_path), log)
    if image is None:
        return None
    if image.size != IMAGE_SHAPE[::-1] or image.mode not in ("RGB", "L"):
        log.report(tree.display(rgb_path), f"expected a 640x480 RGB image, got {image.size[0]}x{image.size[1]} "
                                           f"mode {image.mode}")
        return None
    depth_bytes = tree.read_bytes(depth_path)
    depth = common.check_image(depth_bytes, tree.display(depth_path), log)
    if depth is None:
        return None
    if depth.mode not in _DEPTH_MODES:
        log.report(tree.display(depth_path), f"depth must be a 16-bit PNG in millimetres, got PIL mode {depth.mode}")
        return None
    if depth.size != image.size:
        log.report(tree.display(depth_path), f"depth size {depth.size[0]}x{depth.size[1]} differs from image size "
                                             f"{image.size[0]}x{image.size[1]}")
        return None
    values = np.asarray(depth)
    if values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        log.report(tree.display(depth_path), f"depth values out of the uint16 range: {values.min()}..{values.max()}")
        return None
    return {
        "image": common.rgb_bytes(image, rgb_bytes),
        "depth": depth_bytes if depth.mode == "I;16" else common.png_bytes(values.astype(np.uint16)),
        "scene": scene,
        "scene_class": scene_class,
        "file_name": file_name,
    }
