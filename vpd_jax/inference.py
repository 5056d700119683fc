"""Test-time inference of the references: sliding-window and multi-scale + flip segmentation (mmseg 0.30;
docs/reference.md, "Segmentation test protocol") and the shift-window + flip depth test (GLPDepth/VPD;
docs/reference.md, "Depth test protocol").

Every function takes a model function and arrays with **static shapes**: window positions, resize taps and
coverage counts are computed in Python from the shapes, so one `jax.jit` compilation serves every image of a
given size. The windows of a call are gathered into one batch and run through the model function together
(or in chunks of `chunk_size` through `jax.lax.map`, which traces the model once), then added back into a
canvas (zero-padded adds) in the reference's loop order, so the sums round as the reference's do. The
`*_padded` functions serve the evaluation pipeline's padded batches: static padded shapes, traced valid
sizes, the same numbers inside the valid region (`segment_padded_probs` runs the multi-scale + flip test on them).

Arrays are NHWC. Segmentation images are normalised to [-1, 1] as in training (docs/reference.md, "Segmentation training
data"); model functions return logits, which are upsampled to their input size here if they come back smaller (mmseg's
`encode_decode`).

Where the image resizes happen: the evaluation pipeline (`vpd_jax.data.transforms.seg_eval`, tf.data) does the
single-scale keep-ratio resize exactly as OpenCV does (uint8, fixed-point weights). `segment` can also resize here, in
JAX, from the image it is given to each scale's keep-ratio size: bilinear, half-pixel (align_corners=False) and
**without antialiasing**, like cv2.INTER_LINEAR (jax.image.resize would antialias when downscaling; docs/reference.md,
"Resizes"). That resize works on the normalised float image and does not round to uint8 as cv2 does, so it differs from
the pipeline's by up to about one uint8 step. A resize to the size the image already has is the identity, so a
pipeline-resized image passes through untouched at ratio 1.0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models import resize

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), half-open
SEG_IMG_SCALE = (2048, 512)  # mmseg (long, short) img_scale of the ADE20K test pipeline
AUG_TEST_RATIOS = (1.0, 1.125, 1.25, 1.375, 1.5)  # mmseg --aug-test img_ratios (the reference's)
SMALL_CROP_MODES = ("pad", "direct")


# ------------------------------------------------------------------------------------------- helpers

def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_images(image, name: str) -> None:
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"{name} expects images of shape (B, H, W, 3), got {tuple(image.shape)}")


def _run_in_chunks(fn: Callable, arrays: Sequence[jax.Array], chunk_size: Optional[int]) -> jax.Array:
    """fn(*arrays) for arrays sharing a leading axis N, in one call or in chunks of `chunk_size`.

    Chunks go through `jax.lax.map`, so the model is traced and compiled once whatever the number of
    chunks; the last chunk is filled up with zeros and the extra outputs are dropped."""
    n = arrays[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(*arrays)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunks = -(-n // chunk_size)
    padded = [jnp.pad(a, [(0, chunks * chunk_size - n)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(a.reshape(chunks, chunk_size, *a.shape[1:]) for a in padded))
    return out.reshape(chunks * chunk_size, *out.shape[2:])[:n]


def _divide_by_count(total: jax.Array, count: np.ndarray) -> jax.Array:
    """total / count (a static numpy count broadcastable to total), rounded as the reference's division.

    XLA rewrites x / broadcast(c) into x * broadcast(1 / c), which is off by one ulp unless every count is a
    power of two (203 / 3 != 203 * (1/3) in float32). Counts of 3 do occur (a 900-pixel side has three 512
    windows at stride 341), so those divisors are broadcast to the full shape behind an optimization barrier,
    which XLA cannot see through. (TPUs do not round division exactly in any case.)"""
    counts = count.astype(np.int64)
    if np.all(counts & (counts - 1) == 0):  # powers of two (and 0, whose 0/0 is NaN either way)
        return total / count
    return total / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(count), total.shape))


def _logits_at(logits: jax.Array, size: tuple[int, int], num_classes: int, n: int) -> jax.Array:
    """Checks the model's (n, h', w', C) logits and upsamples them (bilinear, align_corners False) to `size`."""
    if logits.ndim != 4 or logits.shape[0] != n or logits.shape[-1] != num_classes:
        raise ValueError(f"predict_fn must return logits of shape ({n}, h, w, {num_classes}) for {n} inputs of "
                         f"size {size}, got {tuple(logits.shape)}")
    return resize.bilinear(logits.astype(jnp.float32), size, align_corners=False)


# ---------------------------------------------------------------------------------------- segmentation

def window_grid(image_hw: Sequence[int], crop: Sequence[int] | int = (512, 512),
                stride: Sequence[int] | int = (341, 341)) -> list[Window]:
    """mmseg slide windows (y1, y2, x1, x2) in the reference's loop order (rows outer, columns inner).

    grids = max(size - crop + stride - 1, 0) // stride + 1 per axis; window i starts at i * stride, ends at
    min(start + crop, size) and then starts at max(end - crop, 0), so the last window is flush with the
    border and windows are smaller than the crop when the image is (docs/reference.md, "Segmentation test
    protocol")."""
    (h, w), (ch, cw), (sh, sw) = _pair(tuple(image_hw), "image_hw"), _pair(crop, "crop"), _pair(stride, "stride")

    def axis(size, c, s):
        return [_span(i, size, c, s) for i in range(_grid_count(size, c, s))]

    return [(y1, y2, x1, x2) for y1, y2 in axis(h, ch, sh) for x1, x2 in axis(w, cw, sw)]


def _grid_count(size, crop: int, stride: int, maximum=max):
    """Number of slide windows along an axis (a Python int, or an array with maximum=jnp.maximum)."""
    return maximum(size - crop + stride - 1, 0) // stride + 1


def _span(i, size, crop: int, stride: int, maximum=max, minimum=min):
    """(start, end) of window i along an axis: ends at min(i * stride + crop, size), starts crop before."""
    end = minimum(i * stride + crop, size)
    return maximum(end - crop, 0), end


def coverage_count(image_hw: Sequence[int], windows: Sequence[Window]) -> np.ndarray:
    """(H, W) float32 number of windows covering each pixel (mmseg's count_mat)."""
    count = np.zeros(tuple(image_hw), np.float32)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    return count


def slide_inference(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array, num_classes: int,
                    crop: Sequence[int] | int = (512, 512), stride: Sequence[int] | int = (341, 341), *,
                    small_crop: str = "pad", pad_value: float = 0.0,
                    chunk_size: Optional[int] = None) -> jax.Array:
    """mmseg `slide_inference` (docs/reference.md, "Segmentation test protocol"): (B, H, W, 3) -> averaged logits
    (B, H, W, num_classes), float32.

    predict_fn maps crops (N, h, w, 3) to logits (N, h', w', num_classes); logits smaller than the crop are
    upsampled to it (bilinear, align_corners False). Logits are summed into a canvas window by window and
    divided by the coverage count.

    When the image is smaller than `crop` along an axis, every window is the whole image along it:
    * small_crop="direct" runs the model on that smaller crop, as mmseg does;
    * small_crop="pad" (default) pads the crop bottom/right with `pad_value` (0 is the normalised mid-grey the training
      pipeline pads with; docs/reference.md, "Segmentation training data") to the crop size and keeps the logits of the
      real pixels. The model then always sees the crop size, which a UNet needing sizes divisible by 64 may require; a
      conv net's logits near the padded border differ slightly from "direct".
    """
    _check_images(image, "slide_inference")
    if small_crop not in SMALL_CROP_MODES:
        raise ValueError(f"small_crop must be one of {SMALL_CROP_MODES}, got {small_crop!r}")
    b, h, w, _ = image.shape
    ch, cw = _pair(crop, "crop")
    windows = window_grid((h, w), crop, stride)
    win_h, win_w = min(ch, h), min(cw, w)  # every window has this size (see window_grid)
    crops = jnp.concatenate([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])  # window-major
    run_hw = (ch, cw) if small_crop == "pad" else (win_h, win_w)
    if run_hw != (win_h, win_w):
        crops = jnp.pad(crops, [(0, 0), (0, ch - win_h), (0, cw - win_w), (0, 0)], constant_values=pad_value)
    logits = _logits_at(_run_in_chunks(predict_fn, [crops], chunk_size), run_hw, num_classes, crops.shape[0])
    logits = logits[:, :win_h, :win_w].reshape(len(windows), b, win_h, win_w, num_classes)
    canvas = jnp.zeros((b, h, w, num_classes), jnp.float32)
    for k, (y1, y2, x1, x2) in enumerate(windows):  # zero-padded adds fuse into one loop (scatters do not)
        canvas = canvas + jnp.pad(logits[k], [(0, 0), (y1, h - y2), (x1, w - x2), (0, 0)])
    return _divide_by_count(canvas, coverage_count((h, w), windows)[None, :, :, None])


def whole_inference(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array,
                    num_classes: int) -> jax.Array:
    """mmseg `whole_inference`: one pass over the whole (B, H, W, 3) image, logits upsampled (bilinear,
    align_corners False) to (B, H, W, num_classes) if the model returns them smaller."""
    _check_images(image, "whole_inference")
    return _logits_at(predict_fn(image), image.shape[1:3], num_classes, image.shape[0])


def keep_ratio_size(image_hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """mmcv `rescale_size` for a (long, short) scale: factor = min(long / max(h, w), short / min(h, w)),
    size = int(side * factor + 0.5), in Python floats like the reference. Returns (height, width)."""
    h, w = _pair(tuple(image_hw), "image_hw")
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def scale_sizes(original_hw: Sequence[int], ratios: Sequence[float] = (1.0,),
                img_scale: Sequence[int] = SEG_IMG_SCALE) -> list[tuple[int, int]]:
    """Input size of each test scale: mmseg MultiScaleFlipAug turns img_scale (w, h) and a ratio r into the
    scale (int(w * r), int(h * r)), and the keep-ratio Resize maps the original image into it."""
    return [keep_ratio_size(original_hw, (int(img_scale[0] * r), int(img_scale[1] * r))) for r in ratios]


def resize_image(image: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear, align_corners False, no antialiasing (cv2.INTER_LINEAR does not antialias either)."""
    return resize.bilinear(image, size, align_corners=False)


def segment_probs(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array,
                  original_size: Sequence[int], num_classes: int, *, mode: str = "slide",
                  scales: Sequence[float] = (1.0,), flip: bool = False,
                  img_scale: Sequence[int] = SEG_IMG_SCALE, crop: Sequence[int] | int = (512, 512),
                  stride: Sequence[int] | int = (341, 341), small_crop: str = "pad", pad_value: float = 0.0,
                  chunk_size: Optional[int] = None) -> jax.Array:
    """mmseg `aug_test` (or `simple_test` for one scale without flip): class probabilities (B, H0, W0, C) at
    `original_size` (H0, W0), averaged over the passes.

    `image` (B, h, w, 3) is the normalised image at any size, ideally the original one: for each ratio it
    is resized here (`resize_image`) to that scale's keep-ratio size of `original_size`; an image already
    at that size is used as is. Passes run in mmseg's order, each ratio without and then with a horizontal
    flip of the resized image. Each pass: logits (slide or whole) -> bilinear resize (align_corners False,
    no antialias) to the original size -> softmax -> flip back; the probabilities are summed in pass order
    and divided by the number of passes.
    """
    _check_images(image, "segment_probs")
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    if not scales:
        raise ValueError("scales must name at least one ratio, got an empty sequence")
    original_size = _pair(tuple(original_size), "original_size")
    total, passes = None, 0
    for size in scale_sizes(original_size, scales, img_scale):
        scaled = resize_image(image, size)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled[:, :, ::-1] if flipped else scaled
            if mode == "slide":
                logits = slide_inference(predict_fn, x, num_classes, crop, stride, small_crop=small_crop,
                                         pad_value=pad_value, chunk_size=chunk_size)
            else:
                logits = whole_inference(predict_fn, x, num_classes)
            probs = jax.nn.softmax(resize.bilinear(logits, original_size, align_corners=False), axis=-1)
            probs = probs[:, :, ::-1] if flipped else probs
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def segment(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array, original_size: Sequence[int],
            num_classes: int, **kwargs) -> jax.Array:
    """Predicted classes (B, H0, W0) int32: argmax of `segment_probs` (same arguments)."""
    return jnp.argmax(segment_probs(predict_fn, image, original_size, num_classes, **kwargs), axis=-1)


# ------------------------------------------------------------------------------ padded evaluation batches
# The evaluation pipeline pads each keep-ratio-resized image bottom/right to a multiple of 256 and gives its
# valid size (`image_hw`) and the original label size (`label_hw`) as data, so one program serves a handful
# of padded shapes instead of one per image size. The functions below take those sizes as traced arrays and
# reproduce, inside the valid region, the static functions above on the unpadded image; `segment_padded_probs`
# (below) is `segment_probs` for them, the multi-scale + flip test included.

def _valid_mask(hw: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """(B, H, W, 1) True inside each image's valid (h, w) top-left region."""
    rows = jnp.arange(shape[0])[None, :] < hw[:, :1]
    cols = jnp.arange(shape[1])[None, :] < hw[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[..., None]


def _check_sizes(hw, batch: int, name: str) -> jax.Array:
    hw = jnp.asarray(hw)
    if hw.shape != (batch, 2) or not jnp.issubdtype(hw.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch}, 2), got {hw.dtype}{tuple(hw.shape)}")
    return hw.astype(jnp.int32)


def slide_inference_padded(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array, image_hw: jax.Array,
                           num_classes: int, crop: Sequence[int] | int = (512, 512),
                           stride: Sequence[int] | int = (341, 341), *, pad_value: float = 0.0,
                           chunk_size: Optional[int] = None) -> jax.Array:
    """`slide_inference(small_crop="pad")` of each image's valid region, for padded (B, Hp, Wp, 3) batches.

    image_hw (B, 2) holds the valid sizes (traced, at most the padded size, which is not checked on the
    device). Every image gets the window count of the padded size;
    window positions follow the formula for its own size, and windows beyond its own grid are run but add
    nothing, so the valid region's sums (and their rounding) are those of the unpadded image. Pixels outside
    the valid region are replaced by `pad_value` before cropping, so a window larger than the image sees what
    small_crop="pad" gives it. Returns (B, Hp, Wp, num_classes) logits, 0 outside the valid region.
    """
    _check_images(image, "slide_inference_padded")
    b, hp, wp, _ = image.shape
    hw = _check_sizes(image_hw, b, "image_hw")
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    eh, ew = max(hp, ch), max(wp, cw)  # room for a whole crop
    valid = _valid_mask(hw, (eh, ew))
    padded = jnp.pad(image, [(0, 0), (0, eh - hp), (0, ew - wp), (0, 0)])
    padded = jnp.where(valid, padded, jnp.asarray(pad_value, image.dtype))

    def starts(size, c, s, count):  # (B, count) start of each window and whether the image has it
        i = jnp.arange(count)[None, :]
        start, _ = _span(i, size[:, None], c, s, jnp.maximum, jnp.minimum)
        return start, i < _grid_count(size[:, None], c, s, jnp.maximum)

    (ys, y_on), (xs, x_on) = starts(hw[:, 0], ch, sh, _grid_count(hp, ch, sh)), starts(hw[:, 1], cw, sw,
                                                                                      _grid_count(wp, cw, sw))
    rows, cols = ys.shape[1], xs.shape[1]
    ys, xs = jnp.repeat(ys, cols, axis=1), jnp.tile(xs, (1, rows))  # (B, K), rows outer as in the reference
    active = jnp.repeat(y_on, cols, axis=1) & jnp.tile(x_on, (1, rows))
    take = jax.vmap(jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (ch, cw, im.shape[-1])),
                             (None, 0, 0)))
    crops = jnp.swapaxes(take(padded, ys, xs), 0, 1).reshape(-1, ch, cw, image.shape[-1])  # window-major
    logits = _logits_at(_run_in_chunks(predict_fn, [crops], chunk_size), (ch, cw), num_classes, crops.shape[0])
    logits = logits.reshape(rows * cols, b, ch, cw, num_classes)
    place = jax.vmap(lambda z, v, y, x: jax.lax.dynamic_update_slice(z, v, (y, x, 0)))
    canvas = jnp.zeros((b, eh, ew, num_classes), jnp.float32)
    count = jnp.zeros((b, eh, ew, 1), jnp.float32)
    for k in range(rows * cols):
        on = active[:, k, None, None, None]
        canvas = canvas + place(jnp.zeros_like(canvas), jnp.where(on, logits[k], 0.0), ys[:, k], xs[:, k])
        count = count + place(jnp.zeros_like(count), jnp.broadcast_to(on, (b, ch, cw, 1)).astype(jnp.float32),
                              ys[:, k], xs[:, k])
    count = jnp.where(valid, count, 1.0)  # exact division (see _divide_by_count); 0 / 1 outside
    out = jnp.where(valid, canvas, 0.0) / jax.lax.optimization_barrier(jnp.broadcast_to(count, canvas.shape))
    return out[:, :hp, :wp]


def _bilinear_axis_traced(x: jax.Array, axis: int, in_size: jax.Array, out_size: jax.Array,
                          length: int) -> jax.Array:
    """resize.bilinear (align_corners False) along `axis` of (B, ...) x, from each example's first in_size[b]
    entries to out_size[b] entries (sizes traced), written into a static `length`. The taps are computed
    on the device with the float32 operations resize.py does on the host, but XLA on CPU contracts
    multiply-adds into FMAs, so coordinates, weights and results may differ in the last bits (a few 1e-6
    for values near 1, as resize.py itself does from PyTorch)."""
    dst = jnp.arange(length, dtype=jnp.float32)[None, :]
    scale = in_size.astype(jnp.float32)[:, None] / out_size.astype(jnp.float32)[:, None]
    src = jnp.maximum(scale * (dst + jnp.float32(0.5)) - jnp.float32(0.5), jnp.float32(0))
    last = in_size[:, None] - 1
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    i1 = jnp.minimum(i0 + 1, last)
    lam = src - i0.astype(jnp.float32)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = length

    def tap(index, weight):
        gathered = jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[axis] - 1).reshape(shape), axis=axis)
        return gathered * weight.reshape(shape)

    return tap(i0, jnp.float32(1) - lam) + tap(i1, lam)


def resize_padded(x: jax.Array, in_hw: jax.Array, out_hw: jax.Array, out_shape: Sequence[int]) -> jax.Array:
    """Bilinear (align_corners False, no antialias) resize of each (B, H, W, C) example's valid in_hw region
    to its out_hw, in a static (B, *out_shape, C) array, 0 outside out_hw. resize.bilinear's taps on the
    unpadded arrays, with traced sizes."""
    b = x.shape[0]
    in_hw, out_hw = _check_sizes(in_hw, b, "in_hw"), _check_sizes(out_hw, b, "out_hw")
    out_shape = _pair(tuple(out_shape), "out_shape")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x = _bilinear_axis_traced(x, 1, in_hw[:, 0], out_hw[:, 0], out_shape[0])
    x = _bilinear_axis_traced(x, 2, in_hw[:, 1], out_hw[:, 1], out_shape[1])
    return jnp.where(_valid_mask(out_hw, out_shape), x, 0.0)


def keep_ratio_size_padded(hw: jax.Array, scale: Sequence[int]) -> jax.Array:
    """`keep_ratio_size` of each (B, 2) traced original size, in exact integer arithmetic (the reference's float64
    factor min(long / max(h, w), short / min(h, w)) and int(side * factor + 0.5), without float32 rounding)."""
    hw = hw.astype(jnp.int32)
    long_edge, short_edge = max(scale), min(scale)
    big, small = jnp.maximum(hw[:, 0], hw[:, 1]), jnp.minimum(hw[:, 0], hw[:, 1])
    by_long = long_edge * small <= short_edge * big  # long / big <= short / small: the long edge binds
    num = jnp.where(by_long, long_edge, short_edge)[:, None]
    den = jnp.where(by_long, big, small)[:, None]
    return (2 * hw * num + den) // (2 * den)  # floor(side * num / den + 1/2)


def flip_valid(x: jax.Array, hw: jax.Array) -> jax.Array:
    """Each (B, H, W, ...) example's valid (h, w) region mirrored horizontally in place; columns beyond its
    width stay where they are."""
    cols = jnp.arange(x.shape[2])[None, :]
    width = hw[:, 1:2].astype(jnp.int32)
    source = jnp.where(cols < width, width - 1 - cols, cols)
    return jnp.take_along_axis(x, source.reshape(x.shape[0], 1, x.shape[2], *([1] * (x.ndim - 3))), axis=2)


def segment_padded_probs(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array, image_hw: jax.Array,
                         label_hw: jax.Array, label_shape: Sequence[int], num_classes: int, *,
                         scales: Sequence[float] = (1.0,), flip: bool = False,
                         img_scale: Sequence[int] = SEG_IMG_SCALE, crop: Sequence[int] | int = (512, 512),
                         stride: Sequence[int] | int = (341, 341), pad_value: float = 0.0,
                         chunk_size: Optional[int] = None) -> jax.Array:
    """`segment_probs` (mmseg `aug_test`: ratios x (no flip, flip), softmax at the original size, averaged) for
    the evaluation pipeline's padded batches: (B, *label_shape, C) probabilities, uniform outside label_hw.

    `image` holds each example's ratio-1.0 image (the pipeline's keep-ratio resize of the original) in its valid
    `image_hw` region; label_hw is the original size. Each ratio's keep-ratio size of the original is computed on
    the device (`keep_ratio_size_padded`) and the valid region is resized to it here, as `segment_probs` does from
    the image it is given: bilinear without antialiasing from the ratio-1.0 image, where the reference resizes the
    original with OpenCV. The ratio-1.0 pass uses the pipeline's image as is."""
    _check_images(image, "segment_padded_probs")
    if not scales:
        raise ValueError("scales must name at least one ratio, got an empty sequence")
    b, hp, wp, _ = image.shape
    image_hw, label_hw = _check_sizes(image_hw, b, "image_hw"), _check_sizes(label_hw, b, "label_hw")
    label_shape = _pair(tuple(label_shape), "label_shape")
    total, passes = None, 0
    for ratio in scales:
        if ratio == 1.0:
            scaled, hw = image, image_hw
        else:
            hw = keep_ratio_size_padded(label_hw, (int(img_scale[0] * ratio), int(img_scale[1] * ratio)))
            # side_r <= ratio * (side_1 + 1/2) + 1/2 for every original size, and side_1 <= the padded side
            bound = tuple(int(math.floor(ratio * side + ratio / 2 + 0.5)) + 1 for side in (hp, wp))
            scaled = resize_padded(image, image_hw, hw, bound).astype(image.dtype)
        for flipped in ((False, True) if flip else (False,)):
            x = flip_valid(scaled, hw) if flipped else scaled
            logits = slide_inference_padded(predict_fn, x, hw, num_classes, crop, stride, pad_value=pad_value,
                                            chunk_size=chunk_size)
            probs = jax.nn.softmax(resize_padded(logits, hw, label_hw, label_shape), axis=-1)
            probs = flip_valid(probs, label_hw) if flipped else probs
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def segment_padded(predict_fn: Callable[[jax.Array], jax.Array], image: jax.Array, image_hw: jax.Array,
                   label_hw: jax.Array, label_shape: Sequence[int], num_classes: int, **kwargs) -> jax.Array:
    """Predicted classes (B, *label_shape) int32: argmax of `segment_padded_probs` (same arguments). Outside
    label_hw the class is 0 (the padded labels are 255 there, ignored by the metric)."""
    probs = segment_padded_probs(predict_fn, image, image_hw, label_hw, label_shape, num_classes, **kwargs)
    return jnp.argmax(probs, axis=-1)


# ------------------------------------------------------------------------------------------------- depth

def depth_window_offsets(width: int, window: int, shift_size: int = 2) -> list[int]:
    """x offsets of the shift-window test (docs/reference.md, "Depth test protocol"): i * ((width - window) //
    (shift_size - 1)) for i in range(shift_size); [0, 160] for 640-wide images and 480-wide windows.

    As in the reference, when (width - window) is not a multiple of (shift_size - 1) the last columns are
    covered by no window; their depth is 0/0 = NaN, which the clean-up turns into min_depth. shift_size 1
    is one window at x = 0 (the reference divides by zero there)."""
    if shift_size < 1:
        raise ValueError(f"shift_size must be >= 1, got {shift_size}")
    if not 1 <= window <= width:
        raise ValueError(f"depth window width must be in [1, image width {width}], got {window}")
    interval = (width - window) // (shift_size - 1) if shift_size > 1 else 0
    return [i * interval for i in range(shift_size)]


def depth_shift_window_flip(predict_fn: Callable[[jax.Array, jax.Array], jax.Array], image: jax.Array,
                            class_ids: jax.Array, window: Optional[int] = None, shift_size: int = 2,
                            flip: bool = True, *, min_depth: float = 1e-3, max_depth: float = 10.0,
                            chunk_size: Optional[int] = None) -> jax.Array:
    """The VPD/GLPDepth NYUv2 test (docs/reference.md, "Depth test protocol"): (B, H, W, 3) images, (B,) scene ids ->
    depth (B, H, W[, 1]).

    Windows of width `window` (default: the image height, as the reference; 480 on 480x640) at
    `depth_window_offsets`; the model batch is [windows (window-major), their horizontal flips] with each
    image's class id; pred = (pred[:n] + flip(pred[n:])) / 2; window predictions are summed into the canvas
    in window order and divided by the overlap count; then inf -> max_depth, NaN -> min_depth.
    predict_fn(images (N, H, window, 3), class_ids (N,)) returns (N, H, window) or (N, H, window, 1) depth;
    the output keeps that trailing shape.
    """
    _check_images(image, "depth_shift_window_flip")
    b, h, w, _ = image.shape
    if tuple(class_ids.shape) != (b,):
        raise ValueError(f"class_ids must have shape ({b},) for {b} images, got {tuple(class_ids.shape)}")
    window = h if window is None else window
    offsets = depth_window_offsets(w, window, shift_size)
    crops = jnp.concatenate([image[:, :, x:x + window] for x in offsets])
    ids = jnp.tile(class_ids, len(offsets))
    if flip:
        crops, ids = jnp.concatenate([crops, crops[:, :, ::-1]]), jnp.concatenate([ids, ids])
    pred = _run_in_chunks(predict_fn, [crops, ids], chunk_size)
    n = crops.shape[0]
    if pred.ndim not in (3, 4) or pred.shape[:3] != (n, h, window) or pred.shape[3:] not in ((), (1,)):
        raise ValueError(f"predict_fn must return depth of shape ({n}, {h}, {window}) or ({n}, {h}, {window}, 1) "
                         f"for {n} windows, got {tuple(pred.shape)}")
    pred = pred.astype(jnp.float32)
    if flip:
        pred = (pred[:n // 2] + pred[n // 2:, :, ::-1]) / 2.0
    canvas = jnp.zeros((b, h, w, *pred.shape[3:]), jnp.float32)
    count = np.zeros((w,), np.float32)
    for i, x in enumerate(offsets):
        pad = [(0, 0), (0, 0), (x, w - x - window)] + [(0, 0)] * (canvas.ndim - 3)
        canvas = canvas + jnp.pad(pred[i * b:(i + 1) * b], pad)
        count[x:x + window] += 1
    canvas = _divide_by_count(canvas, count.reshape((1, 1, w) + (1,) * (canvas.ndim - 3)))
    return jnp.where(jnp.isnan(canvas), min_depth, jnp.where(jnp.isinf(canvas), max_depth, canvas))
