"""VGPhraseCut as a TFDS builder: one example per (image, phrase) with the union mask of its instances.

Source layout (the `VGPhraseCut_v0` folder of the PhraseCut release): `refer_{train,val,test,miniv}.json` and
`images/<image_id>.jpg`. Each JSON is a list of tasks with `task_id`, `image_id`, `phrase`, `instance_boxes`
(xywh) and `Polygons`: one list of polygons per instance, a polygon being a list of [x, y] points.

The mask follows LD-ZNet's loader (spec/ldznet.md 3.3): every polygon of every instance is rasterised and the
union taken. Rasterisation uses the pixel-centre rule of `skimage.draw.polygon2mask` (pixel (r, c) is inside
when the point x=c, y=r is inside the polygon, even-odd), so skimage is not needed.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from vpd_jax.data.builders import common

# Images with wrong size annotations that LD-ZNet's (CLIPSeg's) loader drops (spec/ldznet.md 3.3).
REFERENCE_EXCLUDED_IMAGE_IDS: tuple[int, ...] = (
    150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344, 286093, 61530, 150333, 286065,
    285814, 498187, 285761, 498042,
)
_SPLIT_FILES = {"train": "refer_train.json", "validation": "refer_val.json", "test": "refer_test.json",
                "miniv": "refer_miniv.json"}


class Phrasecut(tfds.core.GeneratorBasedBuilder):
    """VGPhraseCut phrase-region pairs; splits are the refer_*.json files present."""

    name = "phrasecut"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per task: image, union mask of all instances, phrase."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download VGPhraseCut (https://github.com/ChenyunWu/PhraseCutDataset, download_dataset.py) and put the
    contents of `data/VGPhraseCut_v0/` (refer_*.json and images/) in the manual directory, or the
    `VGPhraseCut_v0` folder itself.
    """

    def __init__(self, *, on_bad_input: str = "raise",
                 exclude_image_ids: tuple[int, ...] = REFERENCE_EXCLUDED_IMAGE_IDS, **kwargs):
        self._on_bad_input = on_bad_input
        self._excluded = frozenset(exclude_image_ids)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="VGPhraseCut: image, referring phrase, union mask (0/1) of all referred instances.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "phrase": tfds.features.Text(),
                "task_id": tfds.features.Text(),
                "image_id": np.int64,
            }),
            homepage="https://people.cs.umass.edu/~chenyun/phrasecut/",
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        if os.path.isdir(os.path.join(root, "VGPhraseCut_v0")):
            root = os.path.join(root, "VGPhraseCut_v0")
        present = {split: os.path.join(root, f) for split, f in _SPLIT_FILES.items()
                   if os.path.isfile(os.path.join(root, f))}
        if not present:
            raise FileNotFoundError(f"phrasecut: none of {sorted(_SPLIT_FILES.values())} in {root}")
        tree = common.SourceTree(root)
        return {split: self._generate_examples(split, tree, path) for split, path in present.items()}

    def _generate_examples(self, split: str, tree: common.SourceTree, json_path: str):
        log = common.BadInputLog(self.name, split, self._on_bad_input)
        with open(json_path) as f:
            tasks = json.load(f)
        by_image = collections.defaultdict(list)
        excluded = 0
        for task in tasks:
            if task["image_id"] in self._excluded:
                excluded += 1
            else:
                by_image[task["image_id"]].append(task)
        if excluded:
            logging.info("phrasecut (%s): excluded %d task(s) of the %d excluded image ids",
                                split, excluded, len(self._excluded))
        for image_id in sorted(by_image):
            image_path = f"images/{image_id}.jpg"
            if not tree.exists(image_path):
                for task in by_image[image_id]:
                    log.report(tree.display(image_path), f"file is missing (task {task['task_id']} in {json_path})")
                continue
            data = tree.read_bytes(image_path)
            image = common.check_image(data, tree.display(image_path), log)
            if image is None:
                continue
            image_bytes = common.rgb_bytes(image, data)
            width, height = image.size
            for task in by_image[image_id]:
                mask = instances_mask(task["Polygons"], height, width)
                if not mask.any():
                    log.report(f"{json_path} task {task['task_id']}", f"empty mask on {image_path} ({width}x{height})")
                    continue
                yield task["task_id"], {
                    "image": image_bytes,
                    "mask": common.png_bytes(mask.astype(np.uint8)[..., None]),
                    "phrase": task["phrase"],
                    "task_id": task["task_id"],
                    "image_id": image_id,
                }
        log.warn()


def instances_mask(instances, height: int, width: int) -> np.ndarray:
    """Union over instances and their polygons, as a (height, width) bool mask."""
    mask = np.zeros((height, width), dtype=bool)
    for polygons in instances:
        for polygon in polygons:
            mask |= polygon_mask(polygon, height, width)
    return mask


def polygon_mask(points, height: int, width: int) -> np.ndarray:
    """Even-odd fill of one polygon ([[x, y], ...]) sampled at integer pixel coordinates (row y, column x)."""
    mask = np.zeros((height, width), dtype=bool)
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        return mask
    r0, r1 = max(int(np.ceil(xy[:, 1].min())), 0), min(int(np.floor(xy[:, 1].max())), height - 1)
    c0, c1 = max(int(np.ceil(xy[:, 0].min())), 0), min(int(np.floor(xy[:, 0].max())), width - 1)
    if r0 > r1 or c0 > c1:
        return mask
    y = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    x = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
    inside = np.zeros((r1 - r0 + 1, c1 - c0 + 1), dtype=bool)
    for (xa, ya), (xb, yb) in zip(xy, np.roll(xy, -1, axis=0)):
        if ya == yb:
            continue
        crosses = (ya > y) != (yb > y)
        x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < x_cross)
    mask[r0:r1 + 1, c0:c1 + 1] = inside
    return mask
