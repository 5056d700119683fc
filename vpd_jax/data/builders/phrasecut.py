"""VGPhraseCut as a TFDS builder: one example per image, holding each of its phrases with the union mask of the
phrase's instances.

Source layout (the `VGPhraseCut_v0` folder of the PhraseCut release): `refer_{train,val,test,miniv}.json` and
`images/<image_id>.jpg`. Each JSON is a list of tasks with `task_id`, `image_id`, `phrase`, `instance_boxes`
(xywh) and `Polygons`: one list of polygons per instance, a polygon being a list of [x, y] points.

Masks follow LD-ZNet's loader (`ldm_seg/data/phrasecut.py`): every polygon of every instance is rasterised with
`skimage.draw.polygon2mask` on its (y, x) points and the union is taken. `polygon_mask` reproduces that
rasteriser without scikit-image: a pixel is inside when its centre (x = column, y = row) is inside the polygon,
on one of its edges or on a vertex (O'Rourke's crossing test), so a square with corners (1, 1) and (5, 5) covers
25 pixels. A phrase whose mask is empty (all polygons outside the image, or degenerate) is kept, as the reference
keeps it; it counts in the metrics like any other.

One example per image keeps each image once on disk and in memory (the training pipeline's epoch permutation
holds a host's examples in memory); the input pipeline flattens the phrases (vpd_jax/data/sources.py).
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from vpd_jax.data.builders import common

# Images with wrong size annotations that LD-ZNet's (CLIPSeg's) loader drops (`invalid_img_ids` there).
REFERENCE_EXCLUDED_IMAGE_IDS: tuple[int, ...] = (
    150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344, 286093, 61530, 150333, 286065,
    285814, 498187, 285761, 498042,
)
_SPLIT_FILES = {"train": "refer_train.json", "validation": "refer_val.json", "test": "refer_test.json",
                "miniv": "refer_miniv.json"}


class Phrasecut(tfds.core.GeneratorBasedBuilder):
    """VGPhraseCut phrase-region pairs grouped by image; splits are the refer_*.json files present."""

    name = "phrasecut"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "One example per task: image, union mask of all instances, phrase.",
        "2.0.0": "One example per image with all its phrases; masks by skimage's polygon2mask rule (edges and "
                 "vertices inside); phrases with empty masks kept.",
    }
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
            description="VGPhraseCut: image and, per phrase, its text, task id and union mask (0/1) of all "
                        "referred instances.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_id": np.int64,
                "phrases": tfds.features.Sequence({
                    "phrase": tfds.features.Text(),
                    "task_id": tfds.features.Text(),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                }),
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
        empty = 0
        for image_id in sorted(by_image):
            image_path = f"images/{image_id}.jpg"
            task_ids = ", ".join(t["task_id"] for t in by_image[image_id])
            if not tree.exists(image_path):
                log.report(tree.display(image_path), f"file is missing (tasks {task_ids} in {json_path})")
                continue
            data = tree.read_bytes(image_path)
            image = common.check_image(data, tree.display(image_path), log)
            if image is None:
                continue
            width, height = image.size
            phrases = []
            for task in by_image[image_id]:
                mask = instances_mask(task["Polygons"], height, width)
                empty += not mask.any()
                phrases.append({"phrase": task["phrase"], "task_id": task["task_id"],
                                "mask": common.png_bytes(mask.astype(np.uint8)[..., None])})
            yield image_id, {"image": common.rgb_bytes(image, data), "image_id": image_id, "phrases": phrases}
        if empty:
            logging.info("phrasecut (%s): %d phrase(s) with an empty mask, kept as the reference keeps them",
                         split, empty)
        log.warn()


def instances_mask(instances, height: int, width: int) -> np.ndarray:
    """Union over instances and their polygons, as a (height, width) bool mask."""
    mask = np.zeros((height, width), dtype=bool)
    for polygons in instances:
        for polygon in polygons:
            mask |= polygon_mask(polygon, height, width)
    return mask


def polygon_mask(points, height: int, width: int) -> np.ndarray:
    """`skimage.draw.polygon2mask((height, width), [(y, x), ...])` of one polygon given as [[x, y], ...].

    Pixel (r, c) is inside when the point x = c, y = r is a vertex (within 1e-12), lies on an edge, or is inside by
    the crossing rule: with rays to the right and to the left, it is inside or on an edge when either ray crosses
    an odd number of edges (O'Rourke, Computational Geometry in C, 7.4). The arithmetic is skimage's, in float64,
    so the masks are the same bit for bit. Only the pixels in the polygon's bounding box are tested.
    """
    mask = np.zeros((height, width), dtype=bool)
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return mask
    xs, ys = xy[:, 0], xy[:, 1]
    r0, r1 = int(max(0.0, ys.min())), min(height - 1, int(np.ceil(ys.max())))
    c0, c1 = int(max(0.0, xs.min())), min(width - 1, int(np.ceil(xs.max())))
    if r0 > r1 or c0 > c1:
        return mask
    y = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    x = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
    vertex = np.zeros((r1 - r0 + 1, c1 - c0 + 1), dtype=bool)
    right = np.zeros_like(vertex)  # parity of crossings of the ray to the right
    left = np.zeros_like(vertex)
    eps = 1e-12
    x1, y1 = xs[-1] - x, ys[-1] - y
    for xv, yv in zip(xs, ys):
        x0, y0 = xv - x, yv - y
        vertex |= (-eps < x0) & (x0 < eps) & (-eps < y0) & (y0 < eps)
        with np.errstate(divide="ignore", invalid="ignore"):  # only used where the edge straddles the ray
            cross = (x0 * y1 - x1 * y0) / (y1 - y0)
        right ^= ((y0 > 0) != (y1 > 0)) & (cross > 0)
        left ^= ((y0 < 0) != (y1 < 0)) & (cross < 0)
        x1, y1 = x0, y0
    mask[r0:r1 + 1, c0:c1 + 1] = vertex | right | left
    return mask
