"""vpd_jax/run/evaluation.py EvalPanels: the TensorBoard pictures of the first eval images of a training run's
evaluations, read back from the event file and checked by value: the rows are the first valid examples of the
batch (padding examples skipped), cropped to their valid size, and the prediction column is the colour-mapped
prediction that the metrics score, Task.eval_predictions on those images (seg: class colours of the slide test's
labels; depth: the colour map of the shift-window and flip test over the range the truth and the prediction
share)."""
from __future__ import annotations

import glob
import io
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers.tasks import smoke_config
from tests.helpers.variables import random_trainer_variables
from vpd_jax import parallel, visualize
from vpd_jax.data import shapes
from vpd_jax.models import presets
from vpd_jax.run import logs
from vpd_jax.run.evaluation import EvalPanels
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.registry import make_task

TITLE = 16  # visualize.titled: the title's height above a cell
GAP = 6  # visualize.side_by_side


def panels_of(task_name: str, count: int, devices: int, seed: int):
    """(task, trainer, host variables, EvalPanels) of the task's smoke model on a mesh of `devices` CPU devices."""
    task = make_task(smoke_config(task_name, eval_panels=count), presets.architecture("tiny"))
    trainer = build_trainer(task.config, task, parallel.make_mesh({"data": devices}, jax.devices()[:devices]))
    return task, trainer, random_trainer_variables(trainer, seed), EvalPanels(trainer, task.config.data, count)


def written_images(panels: EvalPanels, trainer, variables, batch, workdir, step: int) -> dict[str, np.ndarray]:
    """Runs the panels on `batch` inside the run's mesh, writes them with the run's MetricWriter and reads back the
    image summaries of the event file: {tag: (H, W, 3) uint8}."""
    writer = logs.MetricWriter(str(workdir))
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        constants = jax.device_put(trainer.task.constants, trainer.replicated)
        writer.write_images(step, panels.pictures(variables, batch, constants))
    writer.close()
    images = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    assert event.step == step
                    width, height, png = tf.make_ndarray(value.tensor)
                    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                    assert image.shape == (int(height), int(width), 3)
                    images[value.tag] = image
    return images


def cell(image: np.ndarray, x: int, height: int, width: int) -> np.ndarray:
    """The picture of a titled cell whose left edge is at x."""
    return image[TITLE:TITLE + height, x:x + width]


def cell_width(width: int, title: str) -> int:
    return visualize.titled(np.zeros((1, width, 3), np.uint8), title).shape[1]


def to_model_input(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 127.5 - 1.0  # the pipeline's normalisation; to_uint8 inverts it exactly


def test_seg_panels_are_the_first_valid_examples_with_the_test_protocols_labels(tmp_path):
    """Three panels of a batch of four whose second example is padding, on two devices (the forward's batch is
    padded to a multiple of two); the first example is smaller than the padded canvas (image_hw 48 x 64) and its
    label is at twice the image's size, as the eval pipeline gives it."""
    task, trainer, variables, panels = panels_of("seg", count=3, devices=2, seed=3)
    # Host-random weights give logits near the bias everywhere: spread them, so each picture holds several classes.
    head = variables["params"]["head"]["decode_head"]["conv_seg"]
    head["kernel"], head["bias"] = head["kernel"] * 100.0, head["bias"] * 0.0
    scenes = [shapes.render_scene(s, shapes.ShapesConfig(height=64, width=64)) for s in (11, 12, 13, 14)]
    image = np.stack([to_model_input(s.image) for s in scenes])
    image_hw = np.array([[48, 64], [64, 64], [64, 64], [64, 64]], np.int32)
    image[0, 48:] = 0.0  # the pipeline's padding value
    small = np.stack([np.asarray(s.label, np.int32) for s in scenes]) % task.num_classes  # classes at image size
    small[:, :4, :4] = 255  # some ignored pixels
    label = np.full((4, 128, 128), 255, np.int32)
    label[:] = small.repeat(2, 1).repeat(2, 2)  # the original size: 2x the image (2x2 blocks: any nearest resize)
    label[0, 96:] = 255
    batch = {"image": image, "image_hw": image_hw, "label": label, "label_hw": image_hw * 2,
             "valid": np.array([True, False, True, True]), "id": np.array([b"a", b"pad", b"b", b"c"])}
    batch["image"][1], batch["label"][1] = 0.0, 255  # a padding example, as the pipeline zeroes it

    images = written_images(panels, trainer, variables, batch, tmp_path, step=7)

    assert sorted(images) == ["eval_panels/0", "eval_panels/1", "eval_panels/2"]
    used = [0, 2, 3]
    scored = {k: batch[k][used] for k in ("image", "image_hw", "label", "label_hw")}
    scored["valid"] = np.ones(3, bool)
    labels = np.asarray(jax.jit(task.eval_predictions)(variables, scored, task.constants))  # at the label's size
    palette = visualize.class_palette(task.num_classes)
    names = ["wall", "floor", "sphere", "cube", "cylinder", "cone"]
    for row, example in enumerate(used):
        picture = images[f"eval_panels/{row}"]
        height, width = image_hw[example]
        label_h, label_w = 2 * height, 2 * width
        prediction = visualize.resize_nearest(labels[row, :label_h, :label_w], (height, width))
        truth = small[example, :height, :width]
        present = sorted({int(c) for c in np.unique(np.concatenate([truth.ravel(), prediction.ravel()]))} - {255})
        key = visualize.legend([names[c] for c in present], palette[present])
        x_truth = cell_width(width, "input") + GAP
        x_prediction = x_truth + cell_width(width, "ground truth") + GAP
        x_legend = x_prediction + cell_width(width, "prediction") + GAP
        assert picture.shape == (max(TITLE + height, key.shape[0]), x_legend + key.shape[1], 3)
        np.testing.assert_array_equal(cell(picture, 0, height, width), scenes[example].image[:height, :width])
        np.testing.assert_array_equal(cell(picture, x_truth, height, width), visualize.colorize(truth, palette))
        np.testing.assert_array_equal(picture[:key.shape[0], x_legend:], key)
        # The colours of the test protocol's labels; the panel's program (a batch padded to two devices) may break
        # a float-rounding tie of two classes the other way at a few pixels.
        drawn = cell(picture, x_prediction, height, width)
        same = (drawn == visualize.colorize(prediction, palette)).all(-1)
        assert same.mean() > 0.99, same.mean()
        assert len(np.unique(prediction)) > 1  # a picture of several classes: a misplaced crop would show
        assert (picture[TITLE + height:, x_truth:x_legend - GAP] == 255).all()  # cropped: background below


def test_depth_panel_shares_the_colour_range_of_truth_and_prediction(tmp_path):
    task, trainer, variables, panels = panels_of("depth", count=1, devices=1, seed=4)
    scene = shapes.render_scene(21, shapes.ShapesConfig(height=64, width=64))
    image = np.stack([np.zeros((64, 64, 3), np.float32), to_model_input(scene.image)])
    depth = np.stack([np.zeros((64, 64), np.float32), np.asarray(scene.depth, np.float32)])
    depth[1, :8] = 0.0  # no measurement: black
    batch = {"image": image, "depth": depth, "scene_class": np.array([0, 5], np.int32),
             "valid": np.array([False, True]), "id": np.array([b"pad", b"a"])}

    images = written_images(panels, trainer, variables, batch, tmp_path, step=3)

    assert list(images) == ["eval_panels/0"]
    picture = images["eval_panels/0"]
    scored = {"image": image[1:], "depth": depth[1:], "scene_class": np.array([5], np.int32),
              "valid": np.array([True])}
    prediction = np.asarray(jax.jit(task.eval_predictions)(variables, scored, task.constants))[0]
    truth = np.where(depth[1] > 0, depth[1], np.nan)
    low = min(np.nanmin(truth), prediction.min())
    high = max(np.nanmax(truth), prediction.max())
    x_truth = cell_width(64, "input") + GAP
    x_prediction = x_truth + cell_width(64, "ground truth") + GAP
    bar = visualize.colorbar(64, low, high, "m")
    assert picture.shape == (TITLE + 64, x_prediction + 64 + GAP + bar.shape[1], 3)
    np.testing.assert_array_equal(cell(picture, 0, 64, 64), scene.image)
    drawn_truth = cell(picture, x_truth, 64, 64).astype(int)
    assert (drawn_truth[:8] == 0).all()
    # Within one colour level: the range comes from the predicted values, equal up to float rounding.
    assert np.abs(drawn_truth - visualize.colormap(truth, low, high)).max() <= 1
    drawn = cell(picture, x_prediction, 64, 64).astype(int)
    assert np.abs(drawn - visualize.colormap(prediction, low, high)).max() <= 1
    assert np.ptp(drawn) > 0  # not a flat picture


def test_a_training_runs_evaluation_writes_refer_panels_with_the_phrase(tmp_path, monkeypatch):
    """Evaluator.run_and_log over an eval pipeline of one batch (the second example padding): the scalars and one
    panel per valid example reach TensorBoard; the input is titled with the example's sentence, which the eval
    iterator keeps beside its tokens, and the ground truth is the mask over the image."""
    from vpd_jax.data import pipelines
    from vpd_jax.run.evaluation import Evaluator

    task = make_task(smoke_config("refer", eval_panels=4), presets.architecture("tiny"))
    trainer = build_trainer(task.config, task, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    variables = random_trainer_variables(trainer, seed=5)
    scenes = [shapes.render_scene(s, shapes.ShapesConfig(height=64, width=64)) for s in (31, 32, 33)]
    texts = [b"the red cube", b"", b"the sphere on the left"]
    masks = np.stack([s.instance == 0 for s in scenes]).astype(np.int32)
    masks[1] = 0
    elements = {"image": np.stack([to_model_input(s.image) for s in scenes]), "mask": masks,
                "text": np.array(texts), "ref_id": np.array([1, 0, 2]), "sentence_id": np.array([1, 0, 2]),
                "image_id": np.array([31, 0, 33]), "valid": np.array([True, False, True])}
    elements["image"][1] = 0.0
    monkeypatch.setattr(pipelines, "make_eval_dataset",
                        lambda data: tf.data.Dataset.from_tensor_slices(elements).batch(3))

    writer = logs.MetricWriter(str(tmp_path))
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        state = trainer.state_from_variables(variables["params"], variables.get("batch_stats", {}))
        result = Evaluator(trainer, task.config.data).run_and_log(state, 9, str(tmp_path), writer)
    writer.close()
    assert result["eval_batches"] == 1

    tags, images = set(), {}
    for path in glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
                if value.metadata.plugin_data.plugin_name == "images":
                    png = tf.make_ndarray(value.tensor)[2]
                    images[value.tag] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert {"eval/oIoU", "eval/mIoU"} <= tags
    assert sorted(images) == ["eval_panels/0", "eval_panels/1"]
    for row, example in enumerate([0, 2]):
        picture, scene = images[f"eval_panels/{row}"], scenes[example]
        titled = visualize.titled(scene.image, f'"{texts[example].decode()}"')
        np.testing.assert_array_equal(picture[:titled.shape[0], :titled.shape[1]], titled)
        x_truth = titled.shape[1] + GAP
        np.testing.assert_array_equal(cell(picture, x_truth, 64, 64), visualize.mask_overlay(scene.image,
                                                                                            masks[example]))


def test_no_panels_when_eval_panels_is_0(tmp_path):
    from vpd_jax.run.config import base_config
    from vpd_jax.run.training import check_config

    assert base_config("seg", "ade20k").eval_panels == 4
    task = make_task(smoke_config("seg", eval_panels=0), presets.architecture("tiny"))
    trainer = build_trainer(task.config, task, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    panels = EvalPanels(trainer, task.config.data, 0)
    batch = {"image": np.zeros((1, 64, 64, 3), np.float32), "image_hw": np.array([[64, 64]], np.int32),
             "label": np.zeros((1, 64, 64), np.int32), "label_hw": np.array([[64, 64]], np.int32),
             "valid": np.array([True])}
    assert written_images(panels, trainer, None, batch, tmp_path, step=1) == {}
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))  # the file was read
    with pytest.raises(ValueError, match="eval_panels"):
        check_config(smoke_config("seg", eval_panels=-1))
