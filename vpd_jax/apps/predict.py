"""Predictions for image files of any size from a trained run: what predict.py and the demo call.

The run's task makes the predictions (`Task.predict`: each image prepared as the task's evaluation pipeline
prepares its inputs, every output mapped back to the image's size; EMA weights when the run keeps them); this module
writes them. Outputs per image `<stem>`, by the kind of output:
  labels       (seg)    <stem>_labels.png (class ids, palette PNG), <stem>_overlay.png (with a legend)
  attention    (seg)    <stem>_attention.png (the cross-attention map of each predicted class)
  depth        (depth)  <stem>_depth.png (16-bit, millimetres), <stem>_depth_color.png (with a colour bar)
  mask         (refer)  <stem>_mask.png (0 / 255), <stem>_overlay.png
  probability  (ldznet) <stem>_mask.png (probability > threshold, 0 / 255; default 0.3, the threshold of the
                        PhraseCut metrics mIoU@0.3 / IoU_FG@0.3; the reference's script thresholds a
                        per-image min-max colour map instead: docs/reference.md, "PhraseCut metrics", "LD-ZNet
                        inference script"), <stem>_prob.png (the probabilities over the image)
Zero-shot maps (no trained run, a Stable Diffusion folder; vpd_jax/apps/zeroshot.py):
  <stem>_zeroshot.png (heatmap over the image), <stem>_zeroshot_raw.png (the [0, 1] map as 16-bit, 0..65535)
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageOps

from vpd_jax import visualize
from vpd_jax.data.class_names import NYU_SCENE_CLASSES, segmentation_class_names
from vpd_jax.run.setup import setup
from vpd_jax.run.start import restore_step
from vpd_jax.tasks.registry import task_class

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image files named directly or found (non-recursively) in the named folders, in sorted order, each once.
    Two different files with the same name stem would write the same outputs (`<stem>_*.png`): an error names them."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
            if not found:
                raise FileNotFoundError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    files = list(dict.fromkeys(os.path.normpath(f) for f in files))  # a file named twice is predicted once
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(os.path.splitext(os.path.basename(f))[0], []).append(f)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        raise ValueError("these inputs would write the same output files (<stem>_*.png): "
                         + "; ".join(f"{' and '.join(paths)} (stem {stem!r})" for stem, paths in clashes.items())
                         + ". Rename one, or predict them in separate runs with different --output folders")
    return files


class UnreadableImageError(ValueError):
    """An input image that cannot be read or shown as 8-bit RGB: the message names the file and why."""


# Grey levels of 16-bit images span 0..65535 (PNG and TIFF; Pillow opens 16-bit grey as 'I;16*' or as 'I').
_MAX_16BIT = 65535


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file as a viewer displays it: EXIF orientation applied (so the height and
    width are the displayed ones), 16-bit grey levels (0..65535) and floating-point images (0..1) scaled to 8
    bits, palette, grey, CMYK and YCbCr images converted to RGB, and an alpha channel composited over white, the
    background viewers and browsers show. Other value ranges are refused, naming the file."""
    try:
        with Image.open(path) as image:
            return _displayed_rgb(ImageOps.exif_transpose(image), path)
    except UnreadableImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


def _displayed_rgb(image: Image.Image, path: str) -> np.ndarray:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > _MAX_16BIT):
            raise UnreadableImageError(
                f"{path}: 32-bit integer grey levels from {grey.min()} to {grey.max()}, outside the 16-bit range "
                f"0..{_MAX_16BIT} that can be scaled to 8 bits as a viewer shows it; save it as an 8- or 16-bit image")
        return _grey_to_rgb((grey * 255 + _MAX_16BIT // 2) // _MAX_16BIT)
    if mode == "F":
        grey = np.asarray(image, np.float64)
        if grey.size and not (np.isfinite(grey).all() and grey.min() >= 0.0 and grey.max() <= 1.0):
            raise UnreadableImageError(
                f"{path}: floating-point grey levels from {np.nanmin(grey):g} to {np.nanmax(grey):g} (or NaN), not "
                "the range 0..1 that can be scaled to 8 bits; save it as an 8- or 16-bit image")
        return _grey_to_rgb(np.round(grey * 255))
    if image.has_transparency_data:  # an alpha channel, or a palette / grey level marked transparent
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as err:  # a mode Pillow cannot convert (e.g. LAB)
        raise UnreadableImageError(f"{path}: {mode} images cannot be shown as RGB ({err})") from err


def _grey_to_rgb(levels: np.ndarray) -> np.ndarray:
    return np.repeat(levels.astype(np.uint8)[..., None], 3, axis=-1)


def class_names(num_classes: int, names_file: str | None = None, dataset: str = "") -> list[str]:
    """Names for the legend: a file with one name per line, else those of the run's dataset (ADE20K's 150,
    vpd_shapes' 6; data.class_names.segmentation_class_names), else ADE20K's or vpd_shapes' by the class count."""
    if names_file:
        with open(names_file) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{names_file}: {len(names)} class names for a {num_classes}-class model")
        return names
    for name in (dataset, "ade20k", "vpd_shapes"):
        names = segmentation_class_names(name, num_classes)
        if names[0] != "class 0":
            return names
    return names


@dataclasses.dataclass
class Predictor:
    """A trained run's model on one device: `predict(image, **inputs)` gives the task's named outputs."""

    config: object
    workdir: str
    step: int | None = None

    def __post_init__(self):
        run = setup(self.config, devices=jax.devices()[:1], mesh_shape={"data": 1})
        self.task, self.trainer = run.task, run.trainer
        state, self.step = restore_step(self.trainer, os.path.join(self.workdir, "checkpoints"), self.step)
        self.variables = self.trainer.variables(state, use_ema=self.config.optim.ema_decay > 0)
        self.constants = jax.tree.map(jnp.asarray, self.task.constants)

    def predict(self, image: np.ndarray, **inputs) -> dict[str, np.ndarray]:
        return self.task.predict(self.variables, self.constants, image, **inputs)


# ------------------------------------------------------------------------------------------------ outputs


def seg_pictures(image: np.ndarray, labels: np.ndarray, maps: np.ndarray | None, names: Sequence[str],
                 palette: np.ndarray) -> dict[str, np.ndarray]:
    """Overlay with a legend of the classes present, and one attention heatmap per present class (each with the
    colour bar of its values)."""
    present = [int(c) for c in np.unique(labels) if 0 <= c < len(names)]
    pictures = {"overlay": visualize.side_by_side([
        visualize.overlay(image, visualize.colorize(labels, palette)),
        visualize.legend([names[c] for c in present], palette[present])])}
    if maps is not None and present:
        pictures["attention"] = visualize.side_by_side(
            [visualize.titled(visualize.heatmap_with_colorbar(maps[..., c], image), names[c]) for c in present])
    return pictures


def probability_pictures(image: np.ndarray, probs: np.ndarray, threshold: float,
                         caption: str | None = None) -> dict[str, np.ndarray]:
    """A 0 / 255 mask of probs > threshold (the image's size), and the probabilities (viridis, 0 to 1) over the
    image with a colour bar, under the caption (the phrase) when given."""
    return {"mask": np.where(probs > threshold, 255, 0).astype(np.uint8),
            "prob": visualize.probability_overlay(image, probs, caption)}


LDZNET_THRESHOLD = 0.3


def prediction_inputs(task: str, text: str | None, scene: str | None) -> dict:
    """The keyword inputs `Task.predict` of `task` needs, from predict.py's flags; an error names a missing one."""
    needs = task_class(task).predict_inputs
    inputs = {}
    if "text" in needs:
        if not text:
            what = "the expression to segment" if task == "refer" else "the phrase to segment"
            raise ValueError(f"the {task} model needs --text ({what})")
        inputs["text"] = text
    if "scene" in needs:
        if scene not in NYU_SCENE_CLASSES:
            raise ValueError(f"the {task} model needs --scene, one of {', '.join(NYU_SCENE_CLASSES)}; got {scene!r}")
        inputs["scene"] = NYU_SCENE_CLASSES.index(scene)
    return inputs


def write_outputs(stem: str, image: np.ndarray, outputs: dict[str, np.ndarray], *, names: Sequence[str],
                  threshold: float, text: str | None = None,
                  depth_range: tuple[float, float] | None = None) -> list[str]:
    """The files of every output kind of one image (module docstring); returns the paths written."""
    written = []
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    if "labels" in outputs:
        labels = outputs["labels"]
        palette = visualize.class_palette(len(names))
        label_image = Image.fromarray(labels.astype(np.uint8), mode="P")
        label_image.putpalette(palette.flatten().tolist())
        label_image.save(f"{stem}_labels.png")
        written.append(f"{stem}_labels.png")
        for kind, picture in seg_pictures(image, labels, outputs.get("attention"), names, palette).items():
            written.append(visualize.save_png(f"{stem}_{kind}.png", picture))
    if "depth" in outputs:
        written.append(visualize.save_depth_png(f"{stem}_depth.png", outputs["depth"]))
        written.append(visualize.save_png(f"{stem}_depth_color.png",
                                          visualize.depth_picture(outputs["depth"], depth_range)))
    if "mask" in outputs:
        mask = outputs["mask"]
        written.append(visualize.save_png(f"{stem}_mask.png", (mask * 255).astype(np.uint8)))
        written.append(visualize.save_png(f"{stem}_overlay.png", visualize.mask_overlay(image, mask, text)))
    if "probability" in outputs:
        pictures = probability_pictures(image, outputs["probability"], threshold, caption=text)
        written += [visualize.save_png(f"{stem}_{kind}.png", picture) for kind, picture in pictures.items()]
    return written


def predict_files(predictor: Predictor, files: Sequence[str], output: str, *, text: str | None = None,
                  scene: str | None = None, names_file: str | None = None, threshold: float = LDZNET_THRESHOLD,
                  depth_range: tuple[float, float] | None = None) -> list[str]:
    """Writes the outputs of every file into `output`, logging each image as it is done; returns the paths."""
    inputs = prediction_inputs(predictor.task.name, text, scene)
    num_classes = getattr(predictor.task, "num_classes", None)  # tasks whose outputs are class labels
    names = class_names(num_classes, names_file, predictor.config.data.name) if num_classes else []
    written = []
    for i, path in enumerate(files, start=1):
        started = time.perf_counter()
        image = read_image(path)
        stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
        files_written = write_outputs(stem, image, predictor.predict(image, **inputs), names=names,
                                      threshold=threshold, text=text, depth_range=depth_range)
        logging.info("%d/%d %s (%dx%d): %d files in %.1f s", i, len(files), path, image.shape[1], image.shape[0],
                     len(files_written), time.perf_counter() - started)
        written += files_written
    return written


def zeroshot_mapper(sd_folder: str, **overrides):
    """A `ZeroShotMapper` of an SD pipeline root with the defaults of `ZeroShotConfig` except the overrides given
    (None = default)."""
    from vpd_jax.apps import zeroshot  # late: only --zeroshot needs it

    config = dataclasses.replace(zeroshot.ZeroShotConfig(), **{k: v for k, v in overrides.items() if v is not None})
    return zeroshot.ZeroShotMapper.from_pretrained(sd_folder, config)


def predict_zeroshot_files(mapper, files: Sequence[str], output: str, text: str) -> list[str]:
    """Zero-shot noise-difference maps (`vpd_jax.apps.zeroshot.ZeroShotMapper`) of `text` in every file."""
    if not text:
        raise ValueError("zero-shot maps need --text (the phrase to map)")
    written = []
    for path in files:
        image = read_image(path)
        stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
        heat = mapper(image, text)
        written.append(visualize.save_png(f"{stem}_zeroshot.png",
                                          visualize.overlay(image, visualize.colormap(heat, 0.0, 1.0), 0.6)))
        written.append(visualize.save_png(f"{stem}_zeroshot_raw.png",
                                          (np.clip(heat, 0, 1) * 65535).round().astype(np.uint16)))
    return written
