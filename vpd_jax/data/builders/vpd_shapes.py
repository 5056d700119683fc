"""`vpd_shapes` as a TFDS builder, so the same pipelines read it as the real datasets.

Nothing is downloaded: `download_and_prepare()` renders the scenes (vpd_jax.data.shapes). The feature names
follow the real sources so one pipeline adapter per task serves both: `image`/`label` as in ade20k,
`depth`/`scene_class` as in nyu_depth_v2_bts (but float32 metres), `objects` with `id`, `mask` and
`refexp/{refexp_id, raw}` as in ref_coco, and `phrases` (phrase + union mask) for PhraseCut-like training.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from vpd_jax.data import shapes
from vpd_jax.data.builders import common
from vpd_jax.data.class_names import NYU_SCENE_CLASSES


@dataclasses.dataclass
class VpdShapesConfig(tfds.core.BuilderConfig):
    shapes: shapes.ShapesConfig = shapes.ShapesConfig()
    num_train: int = 320
    num_validation: int = 64
    seed: int = 0


class VpdShapes(tfds.core.GeneratorBasedBuilder):
    """Rendered rooms with spheres, cubes, cylinders and cones: segmentation, depth, referring text."""

    name = "vpd_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        VpdShapesConfig(name="default", description="96x128 images, 320 train / 64 validation."),
        VpdShapesConfig(name="small", description="64x64 images, 48 train / 16 validation (tests, smoke runs).",
                        shapes=shapes.ShapesConfig(height=64, width=64), num_train=48, num_validation=16),
        VpdShapesConfig(name="demo", description="128x128 images, 640 train / 64 validation (the demo's "
                        "segmentation).", shapes=shapes.ShapesConfig(height=128, width=128), num_train=640,
                        num_validation=64),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        h, w = self.builder_config.shapes.height, self.builder_config.shapes.width
        mask = tfds.features.Image(shape=(h, w, 1), encoding_format="png")  # 0/1
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(h, w, 3), encoding_format="png"),
                "label": tfds.features.Image(shape=(h, w, 1), encoding_format="png"),  # shapes.SEMANTIC_CLASSES
                "depth": tfds.features.Tensor(shape=(h, w), dtype=np.float32),  # metres
                "scene": tfds.features.Text(),
                "scene_class": tfds.features.ClassLabel(names=NYU_SCENE_CLASSES),
                "file_name": tfds.features.Text(),
                "image/id": np.int64,
                "objects": tfds.features.Sequence({
                    "id": np.int64,
                    "label": tfds.features.ClassLabel(names=shapes.SEMANTIC_CLASSES),
                    "colour": tfds.features.Text(),
                    "mask": mask,
                    "refexp": tfds.features.Sequence({"refexp_id": np.int64, "raw": tfds.features.Text()}),
                }),
                "phrases": tfds.features.Sequence({"raw": tfds.features.Text(), "mask": mask}),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "validation": self._generate_examples("validation", cfg.num_validation)}

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        for image_id, scene in shapes.iter_scenes(cfg.seed, split, count, cfg.shapes):
            yield image_id, example_from_scene(scene, image_id)


def example_from_scene(scene: shapes.Scene, image_id: int) -> dict:
    """The TFDS feature dict of one rendered scene (masks and images as PNG bytes)."""
    def mask_png(mask):
        return common.png_bytes(mask.astype(np.uint8)[..., None])

    return {
        "image": common.png_bytes(scene.image),
        "label": common.png_bytes(scene.label[..., None]),
        "depth": scene.depth,
        "scene": scene.room,
        "scene_class": scene.scene_class,
        "file_name": f"{scene.room}_{image_id:05d}.png",
        "image/id": image_id,
        "objects": [{
            "id": obj.id,
            "label": obj.semantic_id,
            "colour": obj.colour,
            "mask": mask_png(scene.instance == k),
            "refexp": [{"refexp_id": obj.id * shapes.MAX_SENTENCES + j, "raw": s} for j, s in enumerate(obj.sentences)],
        } for k, obj in enumerate(scene.objects)],
        "phrases": [{"raw": phrase, "mask": mask_png(mask)} for phrase, mask in scene.phrases],
    }
