"""Class names of the datasets, in the order the models' outputs and class embeddings use.

ADE20K-150: mmseg's order, i.e. the training label after reduce_zero_label.
NYUv2 scene classes (the text input of VPD's depth model; docs/reference.md, "Class embeddings" and "Depth scene
classes"): the order is VPD's `nyu_class_list.json` (the 27 scene-type folders of `official_splits/train`); row i of the
released `nyu_class_embeddings.pth` belongs to class i, so the order is a fact that must not change.
"""
from __future__ import annotations

# mmseg ADE20KDataset.CLASSES, verbatim ('bed ' has a trailing space there; CLIP's tokenizer drops it).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

# vpd_shapes' semantic labels (vpd_jax/data/shapes.py); 'other' (0) is dropped by reduce_zero_label, as ADE20K's.
VPD_SHAPES_CLASSES: tuple[str, ...] = ("other", "wall", "floor", "sphere", "cube", "cylinder", "cone")

NYU_SCENE_CLASSES: tuple[str, ...] = (
    "printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen",
    "home_office", "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement",
    "excercise_room",  # sic, as in the reference list
    "foyer", "home_storage", "cafe", "furniture_store", "office_kitchen", "student_lounge", "dining_room",
    "reception_room", "computer_lab", "classroom", "office", "bookstore",
)


def nyu_scene_class_id(file_name: str) -> int:
    """The first class (in list order) whose name is a substring of `file_name`.

    `file_name` is VPD's `<scene folder>_<file>`, e.g. `kitchen_0028b_rgb_00045.jpg`. The rule is order dependent on
    purpose, as VPD's (docs/reference.md, "Depth scene classes"): `study_room_*` -> study, `office_kitchen_*` ->
    kitchen, so classes 5 and 19 never occur.
    """
    for class_id, name in enumerate(NYU_SCENE_CLASSES):
        if name in file_name:
            return class_id
    raise ValueError(f"no NYU scene class name is a substring of {file_name!r}")


def segmentation_class_names(dataset: str, num_classes: int) -> list[str]:
    """The names of a segmentation model's `num_classes` outputs on the TFDS dataset `dataset` (ADE20K's 150 or
    vpd_shapes' 6 after reduce_zero_label), else 'class <i>'."""
    family = dataset.split("/")[0]
    if family == "ade20k" and num_classes == len(ADE20K_CLASSES):
        return [name.strip() for name in ADE20K_CLASSES]
    if family == "vpd_shapes" and num_classes == len(VPD_SHAPES_CLASSES) - 1:
        return list(VPD_SHAPES_CLASSES[1:])
    return [f"class {i}" for i in range(num_classes)]
