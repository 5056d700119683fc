"""The VPD tasks' evaluation statistics on padded eval batches against an independent per-image computation.

Each task's `eval_statistics` (what the eval step runs on a batch of the evaluation pipeline: padded images, valid
sizes, padding examples with valid = False) is compared, on fixed random parameters of the tiny smoke model, with
the same protocol run image by image on the unpadded image through the model's forward, `vpd_jax.inference`'s
unpadded functions or the protocol written out here, and `vpd_jax.metrics`' per-image scores (the protocols:
docs/reference.md, "Segmentation test protocol", "Depth test protocol", "Referring metrics").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers.tasks import model_forward, smoke_task
from vpd_jax import inference, metrics


def _paper_backbone(task) -> None:
    """VPD reads the UNet at t = 1 from the unscaled VAE mean (docs/architecture.md)."""
    assert (task.model.timestep, task.model.latent_scale) == (1, 1.0)


def test_seg_eval_statistics_are_the_per_image_slide_test():
    """Two images of other shapes padded into one batch, plus a padding example: the summed areas are those of
    mmseg's single-scale slide test of each image alone, scored at its label's size."""
    task, variables = smoke_task("seg", seed=1)
    _paper_backbone(task)
    e, aug, classes = task.config.eval, task.config.data.aug, task.num_classes
    label_hw = [(48, 96), (60, 30), (40, 40)]
    image_hw = [inference.keep_ratio_size(hw, tuple(aug.img_scale)) for hw in label_hw]
    # img_scale (256, 64): one image wide, one tall, each three 64 px windows at stride 43 (with a stride of 64,
    # two), padded into one 128 x 128 batch as the pipeline pads.
    assert image_hw[:2] == [(64, 128), (128, 64)] and tuple(e.seg_crop) == (64, 64)
    rng = np.random.default_rng(0)
    images = np.zeros((3, 128, 128, 3), np.float32)
    labels = np.full((3, 60, 96), 255, np.int32)
    for i, ((h, w), (lh, lw)) in enumerate(zip(image_hw, label_hw)):
        images[i, :h, :w] = rng.uniform(-1, 1, (h, w, 3))
        labels[i, :lh, :lw] = rng.integers(0, classes, (lh, lw))
    labels[0, :4, :10] = 255  # ignored pixels inside an image
    batch = {"image": images, "image_hw": np.asarray(image_hw, np.int32), "label": labels,
             "label_hw": np.asarray(label_hw, np.int32), "valid": np.asarray([True, True, False])}
    constants = jax.tree.map(jnp.asarray, task.constants)
    statistics = jax.jit(task.eval_statistics)(variables, batch, constants)

    forward = model_forward(task.model, intermediates=True)

    def predict(crops):  # one window at a time: the program tests/apps/test_predict.py compiles too
        return jnp.concatenate([forward(variables, crops[k:k + 1], constants["class_embeddings"])[0]
                                for k in range(crops.shape[0])])

    expected = np.zeros((4, classes), np.int64)
    predicted_classes = set()
    for i in (0, 1):
        (h, w), (lh, lw) = image_hw[i], label_hw[i]
        pred = inference.segment(predict, jnp.asarray(images[i:i + 1, :h, :w]),
                                 (lh, lw), classes, mode="slide", scales=tuple(e.seg_ratios), flip=e.flip,
                                 img_scale=tuple(aug.img_scale), crop=tuple(e.seg_crop), stride=tuple(e.seg_stride))
        expected += metrics.segmentation_areas(np.asarray(pred), labels[i:i + 1, :lh, :lw], classes)
        predicted_classes |= set(np.unique(np.asarray(pred)).tolist())
    assert len(predicted_classes) > 1  # the random model is not a constant map
    assert expected[3].sum() == (labels[:2] != 255).sum()
    np.testing.assert_array_equal(np.asarray(statistics), expected)


def test_depth_eval_statistics_are_the_per_image_shift_window_flip_test():
    """Per image: the depth of each window (the image height wide, at the shift_size offsets) averaged with the
    flipped depth of the flipped window, overlaps averaged; then metrics.depth_scores of that image."""
    task, variables = smoke_task("depth", seed=2, **{"eval.depth_shift_size": 2})
    _paper_backbone(task)
    e, max_depth = task.config.eval, task.config.model.max_depth
    assert e.flip and not e.depth_crop and not e.depth_window
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (3, 64, 96, 3)).astype(np.float32)
    depth = rng.uniform(0.5, 12.0, (3, 64, 96)).astype(np.float32)  # some beyond max_depth: not counted
    depth[:, :8] = 0.0  # no ground truth
    scenes = np.asarray([4, 11, 0], np.int32)
    batch = {"image": images, "depth": depth, "scene_class": scenes, "valid": np.asarray([True, True, False])}
    constants = jax.tree.map(jnp.asarray, task.constants)
    values, counted = jax.jit(task.eval_statistics)(variables, batch, constants)
    np.testing.assert_array_equal(np.asarray(counted), [True, True, False])

    forward, embeddings = model_forward(task.model), constants["class_embeddings"]
    for i in (0, 1):
        ids = jnp.asarray(scenes[i:i + 1])
        canvas, count = np.zeros((64, 96)), np.zeros(96)
        for x in (0, 32):  # offsets i * (96 - 64) // (2 - 1)
            window = jnp.asarray(images[i:i + 1, :, x:x + 64])
            pair = (np.asarray(forward(variables, window, ids, embeddings)[0]),
                    np.asarray(forward(variables, window[:, :, ::-1], ids, embeddings)[0, :, ::-1]))
            canvas[:, x:x + 64] += (pair[0] + pair[1]) / 2
            count[x:x + 64] += 1
        scores = metrics.depth_scores([canvas / count], [depth[i]], e.min_depth, max_depth, crop=None)
        np.testing.assert_allclose(np.asarray(values[i]), [scores[k] for k in metrics.DEPTH_METRICS], rtol=2e-5,
                                   err_msg=f"image {i}")


def test_refer_eval_statistics_are_the_per_sentence_intersection_and_union():
    """Per sentence: intersection and union of the argmax mask of the model's output with the ground truth."""
    task, variables = smoke_task("refer", seed=3)
    _paper_backbone(task)
    rng = np.random.default_rng(2)
    size, length = task.config.data.aug.size, task.config.data.text_max_length
    images = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    tokens = rng.integers(1, task.model.text.vocab_size - 1, (3, length)).astype(np.int32)
    forward = model_forward(task.model)
    # The random model says 'background' almost everywhere: move the classifier's foreground bias by the median
    # margin of the first image, so that about half of each mask is foreground.
    logits = np.asarray(forward(variables, jnp.asarray(images[:1]), jnp.asarray(tokens[:1])))
    variables["params"]["head"]["conv1_1"]["bias"][1] -= np.median(logits[..., 1] - logits[..., 0])
    masks = np.zeros((3, size, size), np.int32)
    masks[:, 10:40, 20:50] = 1
    batch = {"image": images, "tokens": tokens, "mask": masks, "valid": np.asarray([True, True, False])}
    counts, valid = jax.jit(task.eval_statistics)(variables, batch, {})
    np.testing.assert_array_equal(np.asarray(valid), [True, True, False])

    for i in range(3):
        logits = np.asarray(forward(variables, jnp.asarray(images[i:i + 1]), jnp.asarray(tokens[i:i + 1])))[0]
        pred, gt = np.argmax(logits, -1) == 1, masks[i] == 1
        expected = np.asarray([(pred & gt).sum(), (pred | gt).sum()])
        assert 0 < expected[0] < expected[1], expected  # a partial overlap: both counts mean something
        # A pixel whose two logits are equal to float32 rounding may go either way in the batched program.
        ties = int((np.abs(logits[..., 1] - logits[..., 0]) < 1e-5 * np.abs(logits).max()).sum())
        assert ties < 0.01 * pred.size
        assert (np.abs(np.asarray(counts[i]) - expected) <= ties).all(), (i, counts[i], expected, ties)
