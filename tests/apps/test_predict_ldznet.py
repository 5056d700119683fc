"""predict.py for LD-ZNet (a one-step run of configs/ldznet_phrasecut.py:smoke made by train.py) and for zero-shot
maps (a tiny SD pipeline, no run), on an image whose size is not a multiple of 64: every output has the original
size."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from tests.apps.test_zeroshot import odd_image, save_tiny_sd_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = (75, 130)


def _run(args, timeout=1200):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "odd.png"
    Image.fromarray(odd_image(*SIZE)[0]).save(path)
    return str(path)


@pytest.fixture(scope="module")
def ldznet_run(tmp_path_factory):
    """One training step of the LD-ZNet smoke config through train.py, started in the background (the zero-shot
    test runs meanwhile on the second core); the fixture's value waits for it."""
    root = tmp_path_factory.mktemp("ldznet")
    common = [f"--config={REPO}/configs/ldznet_phrasecut.py:smoke", f"--config.data.data_dir={root / 'tfds'}"]
    log = open(root / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--workdir={root / 'run'}",
                             "--config.total_steps=1", "--config.ckpt_every=1", "--config.eval_max_batches=1"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def finish():
        try:
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.close()
        assert proc.returncode == 0, (root / "train.log").read_text()[-4000:]
        return root / "run", common

    yield finish
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_zeroshot_predict_writes_maps_of_the_original_size(ldznet_run, image_path, tmp_path):
    sd = save_tiny_sd_pipeline(str(tmp_path / "sd"))
    out = tmp_path / "out"
    done = _run(["predict.py", "--zeroshot", f"--sd={sd}", f"--input={image_path}", f"--output={out}",
                 "--text=red cube", "--zeroshot_size=64", "--zeroshot_timesteps=300,500", "--zeroshot_draws=2"])
    assert done.returncode == 0, done.stderr[-4000:]
    raw = np.asarray(Image.open(out / "odd_zeroshot_raw.png"))
    assert raw.shape == SIZE and raw.dtype == np.uint16
    assert raw.min() == 0 and raw.max() == 65535  # the [0, 1] map, min-max normalised
    heat = np.asarray(Image.open(out / "odd_zeroshot.png"))
    assert heat.shape == (*SIZE, 3)
    # The CLI is the library: the same map as ZeroShotMapper with the same settings.
    from vpd_jax.apps import predict

    mapper = predict.zeroshot_mapper(sd, timesteps=(300, 500), num_draws=2, image_size=64)
    expected = mapper(np.asarray(Image.open(image_path).convert("RGB")), "red cube")
    assert np.abs(raw.astype(np.int64) - (expected * 65535).round()).max() <= 1

    misuse = _run(["predict.py", "--zeroshot", f"--input={image_path}", f"--output={out}", "--text=x"], timeout=300)
    assert misuse.returncode != 0 and "--sd" in misuse.stderr


@pytest.mark.slow
def test_ldznet_predict_writes_masks_of_the_original_size(ldznet_run, image_path, tmp_path):
    run, common = ldznet_run()
    assert (run / "checkpoints" / "1").is_dir()
    out = tmp_path / "out"
    done = _run(["predict.py", *common, f"--workdir={run}", f"--input={image_path}", f"--output={out}",
                 "--text=red cube", "--threshold=0.5"])
    assert done.returncode == 0, done.stderr[-4000:]
    mask = np.asarray(Image.open(out / "odd_mask.png"))
    assert mask.shape == SIZE and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    prob = np.asarray(Image.open(out / "odd_prob.png"))
    # The image's size, with the phrase above it and the colour bar beside it.
    assert prob.shape[0] == SIZE[0] + 16 and prob.shape[1] > SIZE[1] and prob.std() > 1


def test_ldznet_outputs_threshold_the_probabilities_and_need_a_phrase(tmp_path):
    from vpd_jax import visualize
    from vpd_jax.apps import predict

    image = np.full((3, 4, 3), 100, np.uint8)
    probs = np.array([[0.1, 0.3, 0.31, 0.9]] * 3)
    pictures = predict.probability_pictures(image, probs, 0.3)
    np.testing.assert_array_equal(pictures["mask"][0], [0, 0, 255, 255])
    np.testing.assert_array_equal(pictures["prob"], visualize.with_colorbar(
        visualize.overlay(image, visualize.colormap(probs, 0, 1), 0.6), 0.0, 1.0))
    captioned = predict.probability_pictures(image, probs, 0.3, caption="red cube")["prob"]
    np.testing.assert_array_equal(captioned, visualize.titled(pictures["prob"], '"red cube"'))
    ldznet = types.SimpleNamespace(task=types.SimpleNamespace(name="ldznet"))
    with pytest.raises(ValueError, match="--text"):
        predict.predict_files(ldznet, ["unused.png"], str(tmp_path))
