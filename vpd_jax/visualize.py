"""Pictures of inputs, labels and predictions: palettes, overlays, depth colour maps with a colour bar,
attention heatmaps per token, legends and side-by-side panels (uint8 RGB numpy arrays, written with Pillow); the
pictures of each kind of task output (masks, probabilities, depth) and the evaluation panels built from them.

Used by the demo, predict.py and evaluation (the TensorBoard panels); nothing here depends on JAX.
"""
from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# mmseg's ADE20K palette (class i of the 150, after reduce_zero_label), as r,g,b triples.
_ADE20K_PALETTE = """
    120,120,120 180,120,120 6,230,230 80,50,50 4,200,3 120,120,80 140,140,140 204,5,255 230,230,230 4,250,7
    224,5,255 235,255,7 150,5,61 120,120,70 8,255,51 255,6,82 143,255,140 204,255,4 255,51,7 204,70,3 0,102,200
    61,230,250 255,6,51 11,102,255 255,7,71 255,9,224 9,7,230 220,220,220 255,9,92 112,9,255 8,255,214 7,255,224
    255,184,6 10,255,71 255,41,10 7,255,255 224,255,8 102,8,255 255,61,6 255,194,7 255,122,8 0,255,20 255,8,41
    255,5,153 6,51,255 235,12,255 160,150,20 0,163,255 140,140,140 250,10,15 20,255,0 31,255,0 255,31,0 255,224,0
    153,255,0 0,0,255 255,71,0 0,235,255 0,173,255 31,0,255 11,200,200 255,82,0 0,255,245 0,61,255 0,255,112
    0,255,133 255,0,0 255,163,0 255,102,0 194,255,0 0,143,255 51,255,0 0,82,255 0,255,41 0,255,173 10,0,255
    173,255,0 0,255,153 255,92,0 255,0,255 255,0,245 255,0,102 255,173,0 255,0,20 255,184,184 0,31,255 0,255,61
    0,71,255 255,0,204 0,255,194 0,255,82 0,10,255 0,112,255 51,0,255 0,194,255 0,122,255 0,255,163 255,153,0
    0,255,10 255,112,0 143,255,0 82,0,255 163,255,0 255,235,0 8,184,170 133,0,255 0,255,92 184,0,255 255,0,31
    0,184,255 0,214,255 255,0,112 92,255,0 0,224,255 112,224,255 70,184,160 163,0,255 153,0,255 71,255,0 255,0,163
    255,204,0 255,0,143 0,255,235 133,255,0 255,0,235 245,0,255 255,0,122 255,245,0 10,190,212 214,255,0 0,204,255
    20,0,255 255,255,0 0,153,255 0,41,255 0,255,204 41,0,255 41,255,0 173,0,255 0,245,255 71,0,255 122,0,255
    0,255,184 0,92,255 184,255,0 0,133,255 255,214,0 25,194,194 102,255,0 92,0,255"""
ADE20K_PALETTE = np.array([[int(c) for c in t.split(",")] for t in _ADE20K_PALETTE.split()], np.uint8)

# Anchors of matplotlib's viridis (perceptually uniform, luminance increasing from dark purple to yellow).
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                     [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)
IGNORE_COLOUR = (0, 0, 0)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8: ADE20K's palette for its 150 classes, else well-separated generated hues."""
    if num_classes == len(ADE20K_PALETTE):
        return ADE20K_PALETTE
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.8) for i, h in enumerate(hues)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; ignored or out-of-range ids are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    out = np.zeros((*labels.shape, 3), np.uint8)
    out[:] = IGNORE_COLOUR
    out[valid] = palette[labels[valid]]
    return out


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an (H, W, 3) colour layer over an (H, W, 3) uint8 image."""
    blend = (1 - alpha) * np.asarray(image, np.float64) + alpha * np.asarray(colours, np.float64)
    return blend.round().clip(0, 255).astype(np.uint8)


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Values -> viridis colours (luminance increases with the value); NaN and non-finite values are black."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.where(finite, values, vmin) - vmin) / span, 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - low)[..., None]
    rgb = (1 - frac) * _VIRIDIS[low] + frac * _VIRIDIS[low + 1]
    rgb[~finite] = 0
    return rgb.round().astype(np.uint8)


def _font(size: int = 11):
    return ImageFont.load_default(size=size)


def colorbar(height: int, vmin: float, vmax: float, label: str = "", width: int = 16, ticks: int = 5) -> np.ndarray:
    """A vertical colour bar (vmax at the top) with tick labels, as an RGB array of the given height."""
    bar = colormap(np.linspace(vmax, vmin, height)[:, None].repeat(width, 1), vmin, vmax)
    ticks_width = 32  # room for labels such as "7.5" or "0.25"
    canvas = Image.new("RGB", (width + ticks_width + (7 * len(label) + 6 if label else 0), height), "white")
    canvas.paste(Image.fromarray(bar), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for value in np.linspace(vmin, vmax, ticks):
        y = int(round((vmax - value) / (vmax - vmin or 1) * (height - 1)))
        draw.line([(width, y), (width + 3, y)], fill="black")
        draw.text((width + 5, min(max(y - 6, 0), height - 12)), f"{value:.3g}", fill="black", font=_font())
    if label:  # beside the tick labels, halfway down
        draw.text((width + ticks_width + 2, max(height // 2 - 6, 0)), label, fill="black", font=_font())
    return np.asarray(canvas)


def legend(names: Sequence[str], colours: np.ndarray, swatch: int = 12) -> np.ndarray:
    """One row per class: a colour swatch and the class name."""
    width = swatch + 8 + max((len(n) for n in names), default=1) * 7
    canvas = Image.new("RGB", (width, max(len(names), 1) * (swatch + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, colour) in enumerate(zip(names, colours)):
        y = 4 + i * (swatch + 4)
        draw.rectangle([4, y, 4 + swatch, y + swatch], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((swatch + 10, y), name, fill="black", font=_font())
    return np.asarray(canvas)


def heatmap(attention: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.6) -> np.ndarray:
    """An (h, w) map min-max normalised, resized (nearest) to the image and coloured, optionally over the image."""
    attention = np.asarray(attention, np.float64)
    low, high = np.nanmin(attention), np.nanmax(attention)
    colours = colormap(attention, low, high if high > low else low + 1)
    if image is None:
        return colours
    resized = np.asarray(Image.fromarray(colours).resize(image.shape[1::-1], Image.NEAREST))
    return overlay(image, resized, alpha)


def with_colorbar(picture: np.ndarray, vmin: float, vmax: float, label: str = "") -> np.ndarray:
    """The picture with a colour bar of the range (vmin, vmax) to its right."""
    return side_by_side([picture, colorbar(picture.shape[0], vmin, vmax, label)])


def heatmap_with_colorbar(attention: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.6) -> np.ndarray:
    """`heatmap` with the colour bar of the values it spans."""
    attention = np.asarray(attention, np.float64)
    low, high = float(np.nanmin(attention)), float(np.nanmax(attention))
    return with_colorbar(heatmap(attention, image, alpha), low, high if high > low else low + 1)


def titled(image: np.ndarray, title: str) -> np.ndarray:
    """The image with a one-line title above it."""
    image = np.asarray(image, np.uint8)
    canvas = Image.new("RGB", (max(image.shape[1], 7 * len(title) + 4), image.shape[0] + 16), "white")
    canvas.paste(Image.fromarray(image), (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black", font=_font())
    return np.asarray(canvas)


def side_by_side(images: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images in a row, top-aligned on a white background."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x: x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


def stack(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images in a column, left-aligned on a white background."""
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        canvas[y: y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return canvas


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 6) -> np.ndarray:
    """Rows of cells with aligned columns (each as wide as its widest cell), top-left aligned, white background."""
    columns = max(len(row) for row in rows)
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) for c in range(columns)]
    return stack([side_by_side([np.pad(cell, ((0, 0), (0, widths[c] - cell.shape[1]), (0, 0)), constant_values=255)
                                for c, cell in enumerate(row)], gap) for row in rows], gap)


# ------------------------------------------------------------------------------- pictures of task outputs
# What predict.py writes and the evaluation panels show, by the kind of output (Task.predict's names).

MASK_PALETTE = np.array([[0, 0, 0], [255, 40, 40]], np.uint8)  # background, the referred object


def mask_overlay(image: np.ndarray, mask: np.ndarray, caption: str | None = None) -> np.ndarray:
    """A {0, 1} mask in red over the image, under the caption (the phrase, in quotes) when given."""
    picture = overlay(image, colorize(mask, MASK_PALETTE), 0.45)
    return titled(picture, f'"{caption}"') if caption else picture


def probability_overlay(image: np.ndarray, probs: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Foreground probabilities (viridis, 0 to 1) over the image with a colour bar, under the caption when given."""
    picture = with_colorbar(overlay(image, colormap(probs, 0.0, 1.0), 0.6), 0.0, 1.0)
    return titled(picture, f'"{caption}"') if caption else picture


def depth_picture(depth: np.ndarray, depth_range: tuple[float, float] | None = None) -> np.ndarray:
    """Depth in colour with its colour bar in metres, over `depth_range` (default: the depth's own range)."""
    low, high = depth_range or (float(np.min(depth)), float(np.max(depth)))
    return with_colorbar(colormap(depth, low, high), low, high if high > low else low + 1, "m")


PANEL_KINDS = ("labels", "depth", "mask", "probability")


def eval_panel(image: np.ndarray, kind: str, truth: np.ndarray, prediction: np.ndarray, *,
               names: Sequence[str] = (), caption: str | None = None) -> np.ndarray:
    """One evaluation example as a row of titled cells, input | ground truth | prediction, all of the image's size:
      labels       class colour maps (ignored truth pixels black; `names` gives the classes) and a legend of the
                   classes in either
      depth        metres in colour over one range, that of the valid truth and the prediction together, with
                   its colour bar beside the prediction; truth without a measurement (<= 0) black
      mask         {0, 1} masks in red over the image
      probability  the truth mask over the image; the predicted probabilities over the image with a colour bar
    The input's title is the caption (the phrase, in quotes) when given, else "input"."""
    if np.shape(truth)[:2] != image.shape[:2] or np.shape(prediction)[:2] != image.shape[:2]:
        raise ValueError(f"eval_panel: truth {np.shape(truth)} and prediction {np.shape(prediction)} must have the "
                         f"image's size {image.shape[:2]}")
    if kind == "labels":
        palette = class_palette(len(names))
        shown = np.unique(np.concatenate([np.ravel(truth), np.ravel(prediction)]))
        present = [int(c) for c in shown if 0 <= c < len(names)]
        pictures = [colorize(truth, palette), colorize(prediction, palette)]
        extra = [legend([names[c] for c in present], palette[present])]
    elif kind == "depth":
        truth = np.where(np.asarray(truth) > 0, truth, np.nan)
        values = np.concatenate([np.ravel(truth), np.ravel(prediction)]).astype(np.float64)
        values = values[np.isfinite(values)]
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        pictures, extra = [colormap(truth, low, high), depth_picture(prediction, (low, high))], []
    elif kind == "mask":
        pictures, extra = [mask_overlay(image, truth), mask_overlay(image, prediction)], []
    elif kind == "probability":
        pictures, extra = [mask_overlay(image, truth), probability_overlay(image, prediction)], []
    else:
        raise ValueError(f"panel kind {kind!r}; one of {PANEL_KINDS}")
    cells = [titled(image, f'"{caption}"' if caption else "input"), titled(pictures[0], "ground truth"),
             titled(pictures[1], "prediction")]
    return side_by_side(cells + extra)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, ...) -> (*size, ...) by nearest neighbour (pixel centres), for label maps."""
    array = np.asarray(array)
    rows = ((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(int)
    return array[rows][:, cols]


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, for looking at small images."""
    return np.asarray(image).repeat(factor, 0).repeat(factor, 1)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A [-1, 1] float image (the models' input range) -> uint8 RGB."""
    return ((np.asarray(image, np.float64) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path)
    return path


def save_depth_png(path: str, depth_m: np.ndarray) -> str:
    """Depth in metres -> 16-bit PNG in millimetres (the NYU / KITTI convention; 0 = no value)."""
    mm = np.where(np.isfinite(depth_m), np.asarray(depth_m, np.float64) * 1000, 0).round().clip(0, 65535)
    return save_png(path, mm.astype(np.uint16))
