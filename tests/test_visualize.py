"""Pictures: palettes, colour maps, legends, panels and the depth PNG format."""
import numpy as np
import pytest
from PIL import Image

from vpd_jax import visualize


def _luminance(rgb):
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def test_ade20k_palette_is_mmseg_s():
    assert visualize.ADE20K_PALETTE.shape == (150, 3)
    np.testing.assert_array_equal(visualize.ADE20K_PALETTE[:3], [[120, 120, 120], [180, 120, 120], [6, 230, 230]])
    np.testing.assert_array_equal(visualize.ADE20K_PALETTE[-1], [92, 0, 255])
    assert visualize.class_palette(150) is visualize.ADE20K_PALETTE


@pytest.mark.parametrize("n", [2, 6, 27])
def test_generated_palettes_have_distinct_colours(n):
    palette = visualize.class_palette(n)
    assert palette.shape == (n, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == n


def test_colorize_and_overlay():
    palette = visualize.class_palette(3)
    labels = np.array([[0, 1], [2, 255]])
    colours = visualize.colorize(labels, palette)
    np.testing.assert_array_equal(colours[0, 1], palette[1])
    np.testing.assert_array_equal(colours[1, 1], visualize.IGNORE_COLOUR)  # ignore index is black
    image = np.full((2, 2, 3), 200, np.uint8)
    mixed = visualize.overlay(image, colours, alpha=0.5)
    np.testing.assert_array_equal(mixed[0, 0], np.round((200 + palette[0].astype(float)) / 2))


def test_depth_colormap_is_monotone_in_luminance_and_marks_missing_values():
    ramp = visualize.colormap(np.linspace(0, 10, 200), 0.0, 10.0)
    assert np.all(np.diff(_luminance(ramp)) > 0)
    assert np.array_equal(visualize.colormap(np.array([np.nan, np.inf]), 0, 1), np.zeros((2, 3), np.uint8))
    clipped = visualize.colormap(np.array([-5.0, 50.0]), 0.0, 10.0)
    np.testing.assert_array_equal(clipped, visualize.colormap(np.array([0.0, 10.0]), 0.0, 10.0))


def test_colorbar_runs_from_vmax_at_the_top_to_vmin_at_the_bottom():
    bar = visualize.colorbar(120, 0.0, 10.0, "m")
    assert bar.shape[0] == 120
    column = bar[:, 2]
    assert _luminance(column[0]) > _luminance(column[-1])  # bright (far) at the top


def test_legend_has_one_swatch_per_class():
    palette = visualize.class_palette(4)
    picture = visualize.legend(["a", "b", "c", "d"], palette)
    for colour in palette:  # every class colour appears in the legend
        assert np.any(np.all(picture == colour, axis=-1))


def test_heatmap_is_normalised_and_resized_to_the_image():
    attention = np.array([[0.0, 1.0], [2.0, 3.0]])
    image = np.zeros((8, 8, 3), np.uint8)
    out = visualize.heatmap(attention, image, alpha=1.0)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], visualize.colormap(np.array(0.0), 0, 1))
    np.testing.assert_array_equal(out[7, 7], visualize.colormap(np.array(1.0), 0, 1))


def test_panels_keep_every_part():
    a, b = np.zeros((4, 5, 3), np.uint8), np.full((6, 2, 3), 9, np.uint8)
    row = visualize.side_by_side([a, b], gap=1)
    assert row.shape == (6, 8, 3) and np.all(row[:6, 6:8] == 9)
    column = visualize.stack([a, b], gap=1)
    assert column.shape == (11, 5, 3)
    assert visualize.titled(a, "x").shape[0] == 4 + 16


def test_grid_aligns_columns():
    """A wide cell in one row moves that column's cells in every row (the demo's titled cells differ in width)."""
    wide, narrow = np.zeros((4, 9, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)
    marker = np.full((4, 3, 3), 7, np.uint8)
    out = visualize.grid([[wide, marker], [narrow, marker]], gap=1)
    assert out.shape == (9, 9 + 1 + 3, 3)
    assert np.all(out[:4, 10:13] == 7) and np.all(out[5:9, 10:13] == 7)  # second column at x = 10 in both rows
    assert np.all(out[5:9, 5:10] == 255)  # the narrow cell padded with white


def test_depth_png_is_16_bit_millimetres(tmp_path):
    depth = np.array([[0.0, 1.2345], [9.999, np.nan]])
    path = visualize.save_depth_png(str(tmp_path / "d.png"), depth)
    read = np.asarray(Image.open(path))
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, [[0, 1234], [9999, 0]])  # round(1234.5) = 1234 (half to even)
