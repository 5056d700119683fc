"""`make demo`'s entry point on a shortened schedule, and predict.py on images of awkward sizes for each task."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vpd_jax import metrics, visualize
from vpd_jax.data import shapes
from vpd_jax.data.builders.vpd_shapes import VpdShapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo run exactly as `make demo` starts it, with 3 training steps per task."""
    workdir = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "vpd_jax.apps.demo", f"--workdir={workdir}", "--steps=3",
                           "--panel_images=2"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "mIoU" in done.stdout and "rmse" in done.stdout
    (workdir / "console.txt").write_text(done.stdout)
    return workdir


def test_demo_writes_summary_runs_and_panels(demo_dir):
    with open(demo_dir / "summary.json") as f:
        summary = json.load(f)
    assert set(summary) == {"seg", "depth"}
    for task, s in summary.items():
        assert s["steps"] == 3 and np.isfinite(s["trained"]) and np.isfinite(s["untrained"])
        run = demo_dir / task
        assert (run / "checkpoints").is_dir() and (run / "eval_3.json").is_file() and (run / "eval_0.json").is_file()
        assert any(name.startswith("events") for name in os.listdir(run / "tensorboard"))
        assert os.path.isfile(s["panel"])

    seg = np.asarray(Image.open(summary["seg"]["panel"]).convert("RGB"))
    for colour in visualize.class_palette(len(shapes.SEMANTIC_CLASSES) - 1):  # the legend shows every class
        assert np.any(np.all(seg == colour, axis=-1))
    depth = np.asarray(Image.open(summary["depth"]["panel"]).convert("RGB"))
    # Two rows of four 64x64 images, upscaled 2x, plus the colour bar: the panel is a real picture.
    assert depth.shape[0] > 2 * 2 * 64 and depth.shape[1] > 4 * 2 * 64 and depth.std() > 10


def _demo_scenes(demo_dir, task: str, split: str) -> list:
    """Every scene of a split of a demo task's dataset (the one its run was configured with), rendered again."""
    with open(demo_dir / task / "config.json") as f:
        name = json.load(f)["data"]["name"].split("/")[1]
    builder_config = {c.name: c for c in VpdShapes.BUILDER_CONFIGS}[name]
    count = builder_config.num_train if split == "train" else builder_config.num_validation
    return [scene for _, scene in shapes.iter_scenes(builder_config.seed, split, count, builder_config.shapes)]


def test_demo_summary_has_baselines_and_per_class_scores(demo_dir):
    """Next to the trained and untrained numbers: the model-free baselines (computed here again from the rendered
    scenes) and the IoU of every segmentation class, the same as the run's eval files; the console shows them."""
    with open(demo_dir / "summary.json") as f:
        summary = json.load(f)
    seg, depth = summary["seg"], summary["depth"]
    names = list(shapes.SEMANTIC_CLASSES[1:])
    assert list(seg["IoU"]) == names
    for step, which in ((3, "trained"), (0, "untrained")):
        with open(demo_dir / "seg" / f"eval_{step}.json") as f:
            np.testing.assert_allclose([seg["IoU"][name][which] for name in names], json.load(f)["IoU"])

    train, validation = _demo_scenes(demo_dir, "seg", "train"), _demo_scenes(demo_dir, "seg", "validation")
    train_labels = np.stack([scene.label for scene in train]).astype(int) - 1  # reduce_zero_label (no 'other' here)
    majority = np.stack([(train_labels == c).sum(axis=0) for c in range(len(names))]).argmax(axis=0)
    expected = metrics.segmentation_scores([majority] * len(validation),
                                           [scene.label.astype(int) - 1 for scene in validation], len(names))
    assert seg["baseline"] == pytest.approx(expected["mIoU"])
    np.testing.assert_allclose([seg["IoU"][name]["baseline"] for name in names], expected["IoU"])
    assert expected["IoU"][0] > 0.5 and expected["IoU"][1] > 0.5  # wall above, floor below: a real baseline

    train, validation = _demo_scenes(demo_dir, "depth", "train"), _demo_scenes(demo_dir, "depth", "validation")
    mean_depth = np.mean([scene.depth for scene in train], axis=0)
    rmse = np.mean([np.sqrt(np.mean((mean_depth - scene.depth) ** 2)) for scene in validation])
    assert depth["baseline"] == pytest.approx(rmse, rel=1e-5)
    assert all(isinstance(s["baseline_is"], str) for s in summary.values())

    console = (demo_dir / "console.txt").read_text()
    assert f"baseline: {seg['baseline']:.4f}" in console and f"baseline: {depth['baseline']:.4f}" in console
    assert all(name in console for name in names)


def _odd_image(tmp_path):
    scene = shapes.render_scene(7, shapes.ShapesConfig(height=75, width=130))
    path = tmp_path / "odd.png"
    Image.fromarray(scene.image).save(path)
    return str(path), scene.image.shape[:2]


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_predict_writes_outputs_of_the_original_size(demo_dir, tmp_path, task):
    image_path, size = _odd_image(tmp_path)
    out = tmp_path / "out"
    args = [f"--config={REPO}/configs/demo.py:{task}", f"--workdir={demo_dir / task}", f"--input={image_path}",
            f"--output={out}", f"--config.data.data_dir={demo_dir / 'tfds'}"]
    if task == "depth":
        args.append("--scene=bedroom")
    done = subprocess.run([sys.executable, "predict.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    if task == "seg":
        labels = np.asarray(Image.open(out / "odd_labels.png"))
        assert labels.shape == size and labels.max() < 6
        assert np.asarray(Image.open(out / "odd_overlay.png")).shape[0] == size[0]
        assert (out / "odd_attention.png").is_file()
    else:
        depth = np.asarray(Image.open(out / "odd_depth.png"))
        assert depth.shape == size and depth.dtype == np.uint16
        assert 0 < depth.min() and depth.max() <= 10_000  # millimetres, sigmoid * 10 m
        assert np.asarray(Image.open(out / "odd_depth_color.png")).shape[0] == size[0]
