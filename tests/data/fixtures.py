"""Tiny datasets written in the real on-disk layouts, plus local builders that reuse real TFDS features.

Every writer returns what it wrote (arrays, names) so tests compare the builders' output with the source.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


# --------------------------------------------------------------------------------------------------
# ADE20K: ADEChallengeData2016/{images,annotations}/{training,validation}/
# --------------------------------------------------------------------------------------------------
ADE_SIZES = {"training": [(37, 53), (48, 64), (29, 70)], "validation": [(40, 30), (33, 61)]}  # (h, w)


def write_image(path: str, array: np.ndarray, **save_kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)


def random_rgb(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_ade20k(manual_dir: str, seed: int = 0, as_zip: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{split folder: {stem: raw label}}; images are JPEG, labels single-channel PNG with values 0..150."""
    rng = np.random.default_rng(seed)
    root = os.path.join(manual_dir, "ADEChallengeData2016")
    labels: dict[str, dict[str, np.ndarray]] = {}
    for folder, sizes in ADE_SIZES.items():
        labels[folder] = {}
        tag = "train" if folder == "training" else "val"
        for i, (h, w) in enumerate(sizes, start=1):
            stem = f"ADE_{tag}_{i:08d}"
            label = rng.integers(0, 151, (h, w), dtype=np.uint8)
            label[0, 0] = 150  # the largest raw value is valid
            write_image(f"{root}/images/{folder}/{stem}.jpg", random_rgb(rng, h, w), quality=95)
            write_image(f"{root}/annotations/{folder}/{stem}.png", label)
            labels[folder][stem] = label
    if as_zip:
        zip_path = os.path.join(manual_dir, "ADEChallengeData2016.zip")
        with zipfile.ZipFile(zip_path, "w") as z:
            for base, _, files in os.walk(root):
                for name in files:
                    full = os.path.join(base, name)
                    z.write(full, os.path.relpath(full, manual_dir))
        _rmtree(root)
    return labels


def _rmtree(path: str) -> None:
    for base, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.remove(os.path.join(base, name))
        for name in dirs:
            os.rmdir(os.path.join(base, name))
    os.rmdir(path)


# --------------------------------------------------------------------------------------------------
# NYUv2 BTS layout: sync/<scene>/rgb_*.jpg + sync_depth_*.png, official_splits/test/<scene>/..., lists
# --------------------------------------------------------------------------------------------------
NYU_TRAIN = [("kitchen_0028b", 45), ("kitchen_0028b", 46), ("study_room_0005b", 12), ("office_kitchen_0001a", 7)]
NYU_TEST = [("bathroom", 45), ("living_room", 1)]


def nyu_pair(scene: str, frame: int) -> tuple[str, str]:
    return f"{scene}/rgb_{frame:05d}.jpg", f"{scene}/sync_depth_{frame:05d}.png"


def write_nyu_bts(manual_dir: str, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{split: {rgb path: depth mm uint16}}; lists in VPD's format ('/scene/rgb_x.jpg /scene/sync_depth_x.png')."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    for split, folder, pairs, list_name in (("train", "sync", NYU_TRAIN, "nyu_train_list.txt"),
                                            ("test", "official_splits/test", NYU_TEST, "nyu_test_list.txt")):
        written[split] = {}
        lines = []
        for scene, frame in pairs:
            rgb, depth_path = nyu_pair(scene, frame)
            depth = rng.integers(0, 10000, (480, 640), dtype=np.uint16)
            depth[0, 0] = 0  # missing measurement
            write_image(os.path.join(manual_dir, folder, rgb), random_rgb(rng, 480, 640), quality=90)
            write_image(os.path.join(manual_dir, folder, depth_path), depth)
            written[split][rgb] = depth
            lines.append(f"/{rgb} /{depth_path}")
        with open(os.path.join(manual_dir, list_name), "w") as f:
            f.write("\n".join(lines))  # the real test list has no final newline
    return written


# --------------------------------------------------------------------------------------------------
# VGPhraseCut: refer_{train,val,test}.json + images/<image_id>.jpg
# --------------------------------------------------------------------------------------------------
PHRASECUT_IMAGES = {101: (40, 50), 102: (36, 30), 150417: (20, 20)}  # 150417: a reference-excluded image id


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def phrasecut_task(image_id: int, ann_ids: list[int], phrase: str, instances: list[list[tuple]]) -> dict:
    """A task in the VGPhraseCut format; `instances` is a list of rectangles lists (one list per instance)."""
    name = phrase.split()[-1]
    boxes = []
    for rects in instances:
        xs = [v for r in rects for v in (r[0], r[2])]
        ys = [v for r in rects for v in (r[1], r[3])]
        boxes.append([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
    return {
        "task_id": f"{image_id}__{'_'.join(map(str, ann_ids))}",
        "image_id": image_id,
        "ann_ids": ann_ids,
        "instance_boxes": boxes,
        "Polygons": [[rectangle(*r) for r in rects] for rects in instances],
        "phrase": phrase,
        "phrase_structure": {"name": name, "attributes": phrase.split()[:-1], "relation_ids": [],
                             "relation_descriptions": [], "type": "attribute" if " " in phrase else "name"},
    }


PHRASECUT_TASKS = {
    "train": [
        phrasecut_task(101, [1], "white plate", [[(2.5, 3.5, 20.5, 15.5)]]),
        phrasecut_task(101, [2, 3], "cars", [[(25.5, 20.5, 45.5, 35.5)], [(1.5, 30.5, 10.5, 38.5), (12.5, 30.5, 14.5, 33.5)]]),
        phrasecut_task(102, [4], "tree", [[(0.5, 0.5, 29.5, 10.5)]]),
        phrasecut_task(102, [10], "bench", [[(2, 12, 8, 20)]]),  # integer vertices: edges and corners inside
        phrasecut_task(150417, [5], "sky", [[(0.5, 0.5, 10.5, 10.5)]]),
    ],
    "validation": [phrasecut_task(102, [6], "man on left", [[(3.5, 12.5, 9.5, 34.5)]])],
    "test": [phrasecut_task(101, [7], "red sign", [[(30, 2, 44, 12)]]),
             phrasecut_task(101, [11], "ghost", [[(100.5, 100.5, 120.5, 120.5)]]),  # outside: an empty mask
             phrasecut_task(102, [8, 9], "windows", [[(2.5, 2.5, 6.5, 6.5)], [(20.5, 2.5, 26.5, 8.5)]])],
}
_PHRASECUT_FILES = {"train": "refer_train.json", "validation": "refer_val.json", "test": "refer_test.json"}


def phrasecut_expected_mask(task: dict) -> np.ndarray:
    """LD-ZNet's mask: skimage's polygon2mask of every polygon's (y, x) points, united."""
    from skimage.draw import polygon2mask

    shape = PHRASECUT_IMAGES[task["image_id"]]
    masks = [polygon2mask(shape, np.asarray(polygon)[:, ::-1]) for polygons in task["Polygons"] for polygon in polygons]
    return np.stack(masks).max(0)


def write_phrasecut(manual_dir: str, seed: int = 0, tasks: dict | None = None) -> None:
    rng = np.random.default_rng(seed)
    for image_id, (h, w) in PHRASECUT_IMAGES.items():
        write_image(os.path.join(manual_dir, "images", f"{image_id}.jpg"), random_rgb(rng, h, w), quality=95)
    for split, name in _PHRASECUT_FILES.items():
        with open(os.path.join(manual_dir, name), "w") as f:
            json.dump((tasks or PHRASECUT_TASKS)[split], f)


# --------------------------------------------------------------------------------------------------
# Local builders over the real TFDS feature specs (real TFRecords, ragged specs, PNG masks)
# --------------------------------------------------------------------------------------------------
def _png_1bit(mask: np.ndarray) -> bytes:
    """ref_coco writes masks as PIL mode '1' PNGs (decoded by TFDS as uint8 (H, W, 3) in {0, 255})."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buffer, format="png")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


# Sentences whose REFER `raw` and `sent` are known (REFER's refs: ref 0 of RefCOCO unc, and the refcocog example
# of REFER's format notes). The second needs REFER's own text: no rule on `raw` turns "w" into "with".
REFER_SENT = {
    "THE LADY WITH THE BLUE SHIRT": "the lady with the blue shirt",
    "lady w back to us": "lady with back to us",
    "The nurse in the picture.": "the nurse in the picture",
    "A woman with blond hair wearing a blue shirt.": "a woman with blond hair wearing a blue shirt",
}

# image id -> (size, [(ann id, rectangle (r0, r1, c0, c1), [(sentence id, raw sentence), ...]), ...])
REFCOCO_IMAGES = {
    "train": {
        11: ((30, 40), [(501, (2, 12, 3, 20), [(9001, "man on the left"), (9002, "left guy")]),
                        (502, (10, 28, 22, 38), [(9003, "right woman"), (9004, "woman in red"), (9005, "lady")])]),
        12: ((24, 24), [(503, (0, 10, 0, 10), [(9006, "top left box")])]),
        13: ((20, 36), [(504, (5, 15, 5, 30), [(9007, "long table"), (9008, "table")]),
                        (505, (0, 4, 0, 4), [(9009, "The nurse in the picture.")])]),
    },
    "validation": {
        21: ((32, 32), [(601, (4, 20, 4, 20), [(9101, "THE LADY WITH THE BLUE SHIRT"), (9102, "lady w back to us")]),
                        (602, (20, 30, 1, 31), [(9103, "floor")])]),
        22: ((28, 20), [(603, (1, 27, 1, 9), [(9104, "door"), (9105, "A woman with blond hair wearing a blue shirt."),
                                              (9106, "left door")])]),
    },
}


def refer_sent(raw: str) -> str:
    """REFER's `sent` of a fixture sentence."""
    return REFER_SENT.get(raw, raw)


def write_refcoco_json(path: str) -> str:
    """The refcoco.json TFDS' ref_coco is built from ({'ref': [...]}: REFER refs with dataset, partition and
    sentences), for REFCOCO_IMAGES as RefCOCO unc, plus RefCOCO+ refs with the same sentence ids (another text)."""
    refs = []
    for split, images in REFCOCO_IMAGES.items():
        for image_id, (_, objects) in images.items():
            for ann_id, _, sentences in objects:
                for dataset, text in (("refcoco", refer_sent), ("refcoco+", lambda raw: "not this one")):
                    refs.append({"dataset": dataset, "dataset_partition": "unc", "split": split, "ref_id": ann_id,
                             "image_id": image_id, "ann_id": ann_id,
                             "sentences": [{"sent_id": i, "raw": raw, "sent": text(raw), "tokens": text(raw).split()}
                                           for i, raw in sentences]})
    with open(path, "w") as f:
        json.dump({"ref": refs, "coco_anns": {}}, f)
    return path


def rect_mask(size, rect) -> np.ndarray:
    r0, r1, c0, c1 = rect
    mask = np.zeros(size, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


class RefCocoFixture(tfds.core.GeneratorBasedBuilder):
    """Writes REFCOCO_IMAGES with the real `ref_coco` features (one example per image)."""

    name = "ref_coco_fixture"
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
        features = tfds.builder("ref_coco/refcoco_unc").info.features
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in REFCOCO_IMAGES}

    def _generate_examples(self, split):
        rng = np.random.default_rng(len(split))
        for image_id, (size, refs) in REFCOCO_IMAGES[split].items():
            objects, coco = [], []
            for i, (ann_id, rect, sentences) in enumerate(refs):
                r0, r1, c0, c1 = rect
                box = tfds.features.BBox(r0 / size[0], c0 / size[1], r1 / size[0], c1 / size[1])
                coco.append({"id": ann_id, "area": (r1 - r0) * (c1 - c0), "bbox": box, "label": 1})
                objects.append({**coco[-1], "gt_box_index": i, "mask": _png_1bit(rect_mask(size, rect)),
                                "refexp": [{"refexp_id": s_id, "raw": s} for s_id, s in sentences]})
            yield image_id, {"image": _jpeg(random_rgb(rng, *size)), "image/id": image_id, "objects": objects,
                             "coco_annotations": coco}


class NyuDepthV2Fixture(tfds.core.GeneratorBasedBuilder):
    """A few frames with the real TFDS `nyu_depth_v2` features (float16 metres, no file names)."""

    name = "nyu_depth_v2_fixture"
    VERSION = tfds.core.Version("0.0.1")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.builder("nyu_depth_v2").info.features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3, 0), "validation": self._generate_examples(2, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            depth = rng.uniform(0.5, 9.0, (480, 640)).astype(np.float16)
            yield i, {"image": random_rgb(rng, 480, 640), "depth": depth}


def nyu_fixture_depths(split: str) -> list[np.ndarray]:
    count, seed = {"train": (3, 0), "validation": (2, 1)}[split]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        depth = rng.uniform(0.5, 9.0, (480, 640)).astype(np.float16)
        random_rgb(rng, 480, 640)
        out.append(depth)
    return out


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None, **download) -> tfds.core.DatasetBuilder:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, **download))
    return builder
