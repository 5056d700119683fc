"""Predictions by value: `Predictor` on a workdir whose checkpoint holds known random variables, compared with the
model's own forward on the same image; the files `predict_files` writes hold those values (labels, depth in mm).

Images at the model's working size go through the task's preparation unchanged (the seg keep-ratio resize and the
depth resize are identities there), so the outputs must be the forward's argmax / depth itself. A depth image made
of 2x2 blocks of that image resizes back to it exactly, which checks the resize of the output to the image's size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict
from PIL import Image

from tests.helpers.tasks import model_forward, smoke_config
from tests.helpers.variables import random_trainer_variables
from vpd_jax import parallel
from vpd_jax.apps.predict import Predictor, predict_files
from vpd_jax.data import shapes
from vpd_jax.data.class_names import NYU_SCENE_CLASSES
from vpd_jax.models import presets
from vpd_jax.run.checkpoint import Checkpointer
from vpd_jax.run.trainer import build_trainer
from vpd_jax.tasks.registry import make_task


def saved_run(task_name: str, workdir, seed: int):
    """A workdir with a checkpoint (step 1) of random variables of the task's smoke model; (task, variables)."""
    task = make_task(smoke_config(task_name), presets.architecture("tiny"))
    trainer = build_trainer(task.config, task, parallel.make_mesh({"data": 1}, jax.devices()[:1]))
    variables = random_trainer_variables(trainer, seed)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        assert ckpt.save(1, trainer.state_from_variables(variables["params"], variables["batch_stats"]), force=True)
    return task, variables


def scene_image(height: int, width: int, seed: int) -> np.ndarray:
    return shapes.render_scene(seed, shapes.ShapesConfig(height=height, width=width)).image


def assert_same_variables(predictor: Predictor, variables: dict) -> None:
    ours, saved = flatten_dict(jax.device_get(predictor.variables)), flatten_dict(variables)
    assert ours.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), value, err_msg="/".join(key))


def test_seg_labels_and_attention_maps_are_the_models_own(tmp_path):
    task, variables = saved_run("seg", tmp_path, seed=6)
    predictor = Predictor(task.config, str(tmp_path))
    assert predictor.step == 1
    assert_same_variables(predictor, variables)
    image = scene_image(64, 64, seed=3)
    outputs = predictor.predict(image)

    x = jnp.asarray(image.astype(np.float32) / 255.0 * 2.0 - 1.0)[None]  # the pipeline's normalisation
    logits, features = model_forward(task.model, intermediates=True)(variables, x, task.constants["class_embeddings"])
    logits = np.asarray(logits[0])
    top2 = np.sort(logits, -1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-5 * np.abs(logits).max()  # not a float32 tie
    assert decided.mean() > 0.99 and len(np.unique(outputs["labels"])) > 1
    np.testing.assert_array_equal(outputs["labels"][decided], logits.argmax(-1)[decided])
    maps = np.asarray(features[1][0, ..., -task.num_classes:])  # the 1/16 level
    np.testing.assert_allclose(outputs["attention"], maps, rtol=1e-5, atol=1e-6)

    Image.fromarray(image).save(tmp_path / "scene.png")
    written = predict_files(predictor, [str(tmp_path / "scene.png")], str(tmp_path / "out"))
    assert str(tmp_path / "out" / "scene_labels.png") in written
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "scene_labels.png")), outputs["labels"])


def test_depth_in_metres_and_millimetres_is_the_models_own(tmp_path):
    task, variables = saved_run("depth", tmp_path, seed=7)
    predictor = Predictor(task.config, str(tmp_path))
    assert_same_variables(predictor, variables)
    scene = 5
    small = scene_image(64, 64, seed=4)  # the working size: crop height 64, width a multiple of 32
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # its bilinear half-size resize is `small` again

    x = jnp.asarray(small.astype(np.float32) / 127.5 - 1.0)[None]
    depth = model_forward(task.model)(variables, x, jnp.asarray([scene]), task.constants["class_embeddings"])
    depth = np.asarray(depth[0])
    assert depth.std() > 1e-3 * depth.mean()  # not a constant map
    np.testing.assert_allclose(predictor.predict(small, scene=scene)["depth"], depth, rtol=1e-5)
    upsampled = F.interpolate(torch.from_numpy(depth.copy())[None, None], size=big.shape[:2], mode="bilinear",
                              align_corners=False)[0, 0].numpy()
    big_depth = predictor.predict(big, scene=scene)["depth"]
    np.testing.assert_allclose(big_depth, upsampled, rtol=1e-5)

    Image.fromarray(big).save(tmp_path / "big.png")
    predict_files(predictor, [str(tmp_path / "big.png")], str(tmp_path / "out"), scene=NYU_SCENE_CLASSES[scene])
    millimetres = np.asarray(Image.open(tmp_path / "out" / "big_depth.png"))
    assert millimetres.dtype == np.uint16
    np.testing.assert_array_equal(millimetres, np.round(big_depth.astype(np.float64) * 1000))
    np.testing.assert_allclose(millimetres, upsampled * 1000, atol=0.6)  # rounding, and the 1e-5 above


def test_refer_mask_of_an_odd_sized_image_is_the_models_own(tmp_path):
    """A 75x130 image: the mask has the image's size, is 0 / 255, and is the forward's argmax on the pipeline's
    64x64 version of the image, resized back to 75x130 with F.interpolate's nearest."""
    import tensorflow as tf

    from vpd_jax.data import transforms
    from vpd_jax.data.config import transform_config

    task, variables = saved_run("refer", tmp_path, seed=12)  # a seed whose map has both classes
    predictor = Predictor(task.config, str(tmp_path))
    assert_same_variables(predictor, variables)
    image = scene_image(75, 130, seed=7)
    Image.fromarray(image).save(tmp_path / "odd.png")
    written = predict_files(predictor, [str(tmp_path / "odd.png")], str(tmp_path / "out"), text="the red cube")
    assert sorted(written) == [str(tmp_path / "out" / f"odd_{name}.png") for name in ("mask", "overlay")]
    mask = np.asarray(Image.open(tmp_path / "out" / "odd_mask.png"))
    assert mask.shape == (75, 130) and set(np.unique(mask)) <= {0, 255}

    sample = transforms.refer(tf.constant(image), tf.zeros((75, 130), tf.int32), transform_config(task.config.data))
    x = sample["image"].numpy()[None]
    assert x.shape == (1, 64, 64, 3)
    tokens = task.tokenizer(["the red cube"], task.config.data.text_max_length)
    logits = np.asarray(model_forward(task.model)(variables, jnp.asarray(x), jnp.asarray(tokens))[0])
    decided = np.abs(logits[..., 1] - logits[..., 0]) > 1e-5 * np.abs(logits).max()  # not a float32 tie
    assert decided.mean() > 0.99 and 0 < logits.argmax(-1).mean() < 1  # both classes occur
    labels = np.where(decided, logits.argmax(-1), -1)
    expected = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=(75, 130),
                             mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(mask[expected >= 0], expected[expected >= 0] * 255)

    with pytest.raises(ValueError, match="--text"):
        predict_files(predictor, [str(tmp_path / "odd.png")], str(tmp_path / "out"))
