"""Predictions for image files of any size from a trained run: what predict.py and the demo call.

Each image is prepared as the task's evaluation pipeline prepares its inputs (seg: keep-ratio resize to the
run's img_scale then slide inference; depth: resized to the training crop height with the width rounded to a
multiple of 32; refer: squashed to the square training size), and every output is mapped back to the original
image size. Outputs per image `<stem>`:
  seg    <stem>_labels.png (class ids, palette PNG), <stem>_overlay.png (with a legend),
         <stem>_attention.png (the cross-attention map of each predicted class)
  depth  <stem>_depth.png (16-bit, millimetres), <stem>_depth_color.png (with a colour bar)
  refer  <stem>_mask.png (0 / 255), <stem>_overlay.png
  ldznet <stem>_mask.png (sigmoid > threshold, 0 / 255; default 0.3, the threshold of the PhraseCut metrics
         mIoU@0.3 / IoU_FG@0.3, spec/ldznet.md 4.1 and 6.4), <stem>_prob.png (the probability heatmap over the image)
         The image is squashed to the run's square size (data.aug.size, as the PhraseCut test protocol), the phrase
         is put in data.aug.fixed_template (else the first training template, "a photo of a {}."; the reference
         draws one at random, spec 6.3), the VAE sample and SD noise are seeded by eval.seed, and the probabilities
         are resized back (bilinear, align_corners=True like the squash) before thresholding. EMA weights when the
         run keeps them (as for every task).
Zero-shot maps (no trained run, a Stable Diffusion folder; vpd_jax/zeroshot.py):
  <stem>_zeroshot.png (heatmap over the image), <stem>_zeroshot_raw.png (the [0, 1] map as 16-bit, 0..65535)
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from PIL import Image

from vpd_jax import checkpoint, inference, parallel, tasks, visualize
from vpd_jax.class_embeddings import ADE20K_CLASSES
from vpd_jax.data import shapes, transforms
from vpd_jax.data.config import transform_config
from vpd_jax.data.nyu_scenes import NYU_SCENE_CLASSES
from vpd_jax.models import resize
from vpd_jax.trainer import build_trainer, host_data_config, resolve_architecture

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image files named directly or found (non-recursively) in the named folders, in sorted order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    return files


def read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err


def class_names(num_classes: int, names_file: str | None = None) -> list[str]:
    """Names for the legend: a file with one name per line, else ADE20K's 150 or vpd_shapes' classes."""
    if names_file:
        with open(names_file) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{names_file}: {len(names)} class names for a {num_classes}-class model")
        return names
    if num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    if num_classes == len(shapes.SEMANTIC_CLASSES) - 1:
        return list(shapes.SEMANTIC_CLASSES[1:])
    return [f"class {i}" for i in range(num_classes)]


def _element_spec(task: tasks.Task, config) -> types.SimpleNamespace:
    """What build_trainer reads from a dataset (keys, dtypes, shapes), without needing the dataset on disk:
    predictions work on machines that have only the checkpoint."""
    size = 64
    specs = {"image": tf.TensorSpec((None, size, size, 3), tf.float32)}
    if task.name == "depth":
        specs["scene_class"] = tf.TensorSpec((None,), tf.int32)
    if task.name in ("refer", "ldznet"):
        specs["text"] = tf.TensorSpec((None,), tf.string)
    return types.SimpleNamespace(element_spec=specs)


@dataclasses.dataclass
class Predictor:
    config: object
    workdir: str
    step: int | None = None

    def __post_init__(self):
        config = self.config
        self.task = tasks.make_task(config, resolve_architecture(config))
        mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
        data = host_data_config(config, 1)
        self.trainer = build_trainer(config, self.task, mesh, data, _element_spec(self.task, config))
        root = os.path.join(self.workdir, "checkpoints")
        ckpt = checkpoint.Checkpointer(root, read_only=True)
        try:
            self.step = ckpt.latest_step() if self.step is None else self.step
            if self.step is None or self.step not in ckpt.all_steps():
                raise FileNotFoundError(f"{root}: no checkpoint for step {self.step} (steps: {ckpt.all_steps()})")
            with nn.logical_axis_rules(self.trainer.rules):
                state = ckpt.restore(self.step, self.trainer.abstract_state)
        finally:
            ckpt.close()
        self.variables = self.trainer.variables(state, use_ema=config.optim.ema_decay > 0)
        self.constants = jax.tree.map(jnp.asarray, self.task.constants)
        self.aug = transform_config(config.data)
        self._apply = jax.jit(lambda v, *args: self.task.model.apply(v, *args, train=False))
        # LD-ZNet draws its VAE sample and SD timestep / noise from per-example keys (eval.seed): the task's apply.
        self._task_apply = jax.jit(lambda v, batch: self.task.apply(v, batch, {}, train=False)[0])
        self._features = jax.jit(lambda v, *args: self.task.model.apply(
            v, *args, train=False, mutable=["intermediates"])[1]["intermediates"]["features"][0])

    # ------------------------------------------------------------------------------------------ per task

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels (H, W) at the original size, per-class attention maps (h, w, N) of the resized image)."""
        resized = transforms.seg_eval(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), self.aug)["image"]
        resized = jnp.asarray(resized.numpy())[None]
        embeddings = self.constants["class_embeddings"]
        e = self.config.eval

        labels = inference.segment(lambda crops: self._apply(self.variables, crops, embeddings), resized,
                                   image.shape[:2], self.task.num_classes, mode="slide",
                                   img_scale=tuple(self.aug.img_scale), crop=tuple(e.seg_crop),
                                   stride=tuple(e.seg_stride))
        padded = _pad_to_multiple(resized, 64)
        features = self._features(self.variables, padded, embeddings)
        n = self.task.num_classes
        # The maps of the 1/16 level, cropped to the part that covers the image (not its padding).
        valid = [-(-side // 16) for side in resized.shape[1:3]]
        maps = np.asarray(features[1][0, :valid[0], :valid[1], -n:]) if self.config.model.use_attn else None
        return np.asarray(labels[0]), maps

    def depth(self, image: np.ndarray, scene_class: int) -> np.ndarray:
        height = int(self.aug.crop_size[0])
        width = max(32, int(round(image.shape[1] * height / image.shape[0] / 32)) * 32)
        resized = tf.image.resize(tf.constant(image, tf.float32), (height, width), method="bilinear")
        x = jnp.asarray(resized.numpy() / 127.5 - 1.0, jnp.float32)[None]
        pred = self._apply(self.variables, x, jnp.asarray([scene_class], jnp.int32),
                           self.constants["class_embeddings"])
        return np.asarray(resize.bilinear(pred[..., None], image.shape[:2])[0, ..., 0])

    def refer(self, image: np.ndarray, text: str) -> np.ndarray:
        sample = transforms.refer(tf.constant(image), tf.zeros(image.shape[:2], tf.int32), self.aug)
        tokens = self.task.tokenizer([text], self.config.data.text_max_length)
        logits = self._apply(self.variables, jnp.asarray(sample["image"].numpy())[None], jnp.asarray(tokens))
        mask = jnp.argmax(logits, -1)[..., None].astype(jnp.int32)
        return np.asarray(resize.nearest(mask, image.shape[:2])[0, ..., 0])

    def ldznet(self, image: np.ndarray, phrase: str) -> np.ndarray:
        """Foreground probabilities (H, W) at the original size (module docstring: size, template, seeds)."""
        sample = transforms.phrasecut_eval(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), self.aug)
        template = self.aug.fixed_template or self.aug.templates[0]
        tokens = self.task.tokenizer([template.replace("{}", phrase)], self.config.data.text_max_length)
        batch = {"image": jnp.asarray(sample["image"].numpy())[None], "tokens": jnp.asarray(tokens)}
        probs = jax.nn.sigmoid(self._task_apply(self.variables, batch))
        return np.asarray(resize.bilinear(probs, image.shape[:2], align_corners=True)[0, ..., 0])


def _pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
    h, w = images.shape[1:3]
    return jnp.pad(images, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)))


# ------------------------------------------------------------------------------------------------ outputs


def seg_pictures(image: np.ndarray, labels: np.ndarray, maps: np.ndarray | None, names: Sequence[str],
                 palette: np.ndarray) -> dict[str, np.ndarray]:
    """Overlay with a legend of the classes present, and one attention heatmap per present class."""
    present = [int(c) for c in np.unique(labels) if 0 <= c < len(names)]
    pictures = {"overlay": visualize.side_by_side([
        visualize.overlay(image, visualize.colorize(labels, palette)),
        visualize.legend([names[c] for c in present], palette[present])])}
    if maps is not None and present:
        pictures["attention"] = visualize.side_by_side(
            [visualize.titled(visualize.heatmap(maps[..., c], image), names[c]) for c in present])
    return pictures


def depth_pictures(depth: np.ndarray, max_depth: float) -> np.ndarray:
    return visualize.side_by_side([visualize.colormap(depth, 0.0, max_depth),
                                   visualize.colorbar(depth.shape[0], 0.0, max_depth, "m")])


def probability_pictures(image: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """A 0 / 255 mask of probs > threshold, and the probabilities (viridis, 0 to 1) over the image."""
    return {"mask": np.where(probs > threshold, 255, 0).astype(np.uint8),
            "prob": visualize.overlay(image, visualize.colormap(probs, 0.0, 1.0), 0.6)}


LDZNET_THRESHOLD = 0.3


def predict_files(predictor: Predictor, files: Sequence[str], output: str, *, text: str | None = None,
                  scene: str | None = None, names_file: str | None = None,
                  threshold: float = LDZNET_THRESHOLD) -> list[str]:
    """Writes the outputs of every file into `output`; returns the paths written."""
    task = predictor.task.name
    if task == "refer" and not text:
        raise ValueError("the referring model needs --text (the expression to segment)")
    if task == "ldznet" and not text:
        raise ValueError("the LD-ZNet model needs --text (the phrase to segment)")
    if task not in ("seg", "depth", "refer", "ldznet"):
        raise ValueError(f"predict.py has no outputs for task {task!r}")
    scene_class = None
    if task == "depth":
        if scene not in NYU_SCENE_CLASSES:
            raise ValueError(f"the depth model needs --scene, one of {', '.join(NYU_SCENE_CLASSES)}; got {scene!r}")
        scene_class = NYU_SCENE_CLASSES.index(scene)
    written = []
    for path in files:
        image = read_image(path)
        stem = os.path.join(output, os.path.splitext(os.path.basename(path))[0])
        if task == "seg":
            labels, maps = predictor.segment(image)
            names = class_names(predictor.task.num_classes, names_file)
            palette = visualize.class_palette(len(names))
            label_image = Image.fromarray(labels.astype(np.uint8), mode="P")
            label_image.putpalette(palette.flatten().tolist())
            os.makedirs(output, exist_ok=True)
            label_image.save(f"{stem}_labels.png")
            written.append(f"{stem}_labels.png")
            for kind, picture in seg_pictures(image, labels, maps, names, palette).items():
                written.append(visualize.save_png(f"{stem}_{kind}.png", picture))
        elif task == "depth":
            depth = predictor.depth(image, scene_class)
            written.append(visualize.save_depth_png(f"{stem}_depth.png", depth))
            written.append(visualize.save_png(f"{stem}_depth_color.png",
                                              depth_pictures(depth, predictor.config.model.max_depth)))
        elif task == "ldznet":
            pictures = probability_pictures(image, predictor.ldznet(image, text), threshold)
            written += [visualize.save_png(f"{stem}_{kind}.png", picture) for kind, picture in pictures.items()]
        else:
            mask = predictor.refer(image, text)
            written.append(visualize.save_png(f"{stem}_mask.png", (mask * 255).astype(np.uint8)))
            colours = visualize.colorize(mask, np.array([[0, 0, 0], [255, 40, 40]], np.uint8))
            written.append(visualize.save_png(f"{stem}_overlay.png", visualize.overlay(image, colours, 0.45)))
    return written


def zeroshot_mapper(sd_folder: str, **overrides):
    """A `ZeroShotMapper` of an SD pipeline root with the defaults of `ZeroShotConfig` except the overrides given
    (None = default)."""
    from vpd_jax import zeroshot

    config = dataclasses.replace(zeroshot.ZeroShotConfig(), **{k: v for k, v in overrides.items() if v is not None})
    return zeroshot.ZeroShotMapper.from_pretrained(sd_folder, config)


def predict_zeroshot_files(mapper, files: Sequence[str], output: str, text: str) -> list[str]:
    """Zero-shot noise-difference maps (`vpd_jax.zeroshot.ZeroShotMapper`) of `text` in every file."""
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
