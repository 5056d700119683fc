"""Input images for predictions are read as a viewer shows them (issue 19): EXIF orientation, 16-bit and float
grey levels, palette / alpha / CMYK; what cannot be shown is refused naming the file; outputs have the displayed
size; inputs that would overwrite each other's outputs are refused."""
from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vpd_jax.apps import predict
from vpd_jax.apps.predict import UnreadableImageError, list_images, read_image

EXIF_ORIENTATION = 0x0112
ROTATED_90_CLOCKWISE = 6  # "the 0th row is the visual right side": a viewer turns it 90 degrees clockwise


def quadrants(height: int = 4, width: int = 6) -> np.ndarray:
    """An RGB image whose four quadrants have different colours, so that any flip or turn shows."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2:] = (0, 255, 0)
    image[height // 2:, : width // 2] = (0, 0, 255)
    image[height // 2:, width // 2:] = (255, 255, 0)
    return image


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored 6 wide x 4 high with orientation 6 is shown 4 wide x 6 high, turned clockwise."""
    stored = quadrants()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CLOCKWISE
    path = str(tmp_path / "phone.png")
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(read_image(path), np.rot90(stored, k=-1))
    plain = str(tmp_path / "plain.png")
    Image.fromarray(stored).save(plain)
    np.testing.assert_array_equal(read_image(plain), stored)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (Pillow: mode I;16) used to be clipped to 255, a white image, by Image.convert('RGB')."""
    levels = np.array([[0, 257, 30000, 65535]], np.uint16)
    path = str(tmp_path / "grey16.png")
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    got = read_image(path)
    assert got.shape == (1, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], [[0, 1, round(30000 / 257), 255]])
    assert (got == got[..., :1]).all()  # grey: the three channels agree


def test_32_bit_integer_and_float_images(tmp_path):
    ints = tmp_path / "ints.tif"
    Image.fromarray(np.array([[0, 65535]], np.int32)).save(ints)
    np.testing.assert_array_equal(read_image(str(ints))[..., 0], [[0, 255]])
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(ints)
    with pytest.raises(UnreadableImageError, match=rf"{ints}: 32-bit integer grey levels from 0 to 70000"):
        read_image(str(ints))
    floats = tmp_path / "floats.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(floats)
    np.testing.assert_array_equal(read_image(str(floats))[..., 0], [[0, 128, 255]])
    Image.fromarray(np.array([[0.0, 3.0]], np.float32)).save(floats)
    with pytest.raises(UnreadableImageError, match=rf"{floats}: floating-point grey levels from 0 to 3"):
        read_image(str(floats))


def test_palette_alpha_and_cmyk_are_converted(tmp_path):
    rgb = quadrants()
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "palette.png")), rgb)

    # Alpha: half transparent over white, as viewers and browsers show it; the stored colour does not matter.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = [[0, 255], [128, 255]]
    rgba[0, 1, :3] = (10, 20, 30)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    got = read_image(str(tmp_path / "alpha.png"))
    np.testing.assert_array_equal(got[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(got[0, 1], (10, 20, 30))
    assert abs(int(got[1, 0, 0]) - 127) <= 1  # black at alpha 128 over white

    grey_alpha = Image.fromarray(np.array([[[200, 255]]], np.uint8), mode="LA")
    grey_alpha.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "la.png")), [[[200, 200, 200]]])

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    got = read_image(str(tmp_path / "cmyk.jpg"))
    assert got.shape == rgb.shape and np.abs(got.astype(int) - rgb).max() <= 8


def test_unreadable_files_are_named(tmp_path):
    truncated = tmp_path / "cut.png"
    Image.fromarray(quadrants(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    for path in (truncated, not_an_image):
        with pytest.raises(UnreadableImageError, match=rf"{path}: not a readable image"):
            read_image(str(path))


class _Task:
    name = "seg"
    num_classes = 2


class _EchoPredictor:
    """A seg 'model' that labels the left half of the image it is given 1: its outputs have the input's size."""

    task = _Task()
    config = ml_collections.ConfigDict({"model": {}, "data": {"name": "vpd_shapes/small"}})

    def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
        labels = np.zeros(image.shape[:2], np.uint8)
        labels[:, : image.shape[1] // 2] = 1
        return {"labels": labels}


def test_outputs_have_the_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CLOCKWISE
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(quadrants(40, 60)).save(path, exif=exif)
    written = predict.predict_files(_EchoPredictor(), [path], str(tmp_path / "out"))
    labels = [p for p in written if p.endswith("_labels.png")]
    assert labels and Image.open(labels[0]).size == (40, 60)  # (width, height) as displayed
    overlay = [p for p in written if p.endswith("_overlay.png")]
    assert Image.open(overlay[0]).size[1] == 60


def test_inputs_that_would_write_the_same_outputs_are_refused(tmp_path):
    for name in ("a.png", "a.jpg", "b.png", ".hidden.png"):
        Image.fromarray(quadrants()).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png \(stem 'a'\)"):
        list_images([str(tmp_path)])
    os.remove(tmp_path / "a.jpg")
    b = str(tmp_path / "b.png")
    assert list_images([str(tmp_path), b]) == [str(tmp_path / "a.png"), b]  # b once; the hidden file skipped
