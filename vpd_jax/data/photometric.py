"""Photometric augmentations on uint8 RGB images with the integer semantics of the references:
mmseg 0.30 `PhotoMetricDistortion` (segmentation; docs/reference.md, "Segmentation training data") and
albumentations 1.1-1.3 `RandomBrightnessContrast`, `RandomGamma`, `HueSaturationValue` (depth; docs/reference.md,
"Depth training data").

Every op reads and writes uint8 and rounds or truncates exactly where the reference does. HSV is
OpenCV's 8-bit HSV (H in 0..179, S and V in 0..255); `rgb_to_hsv_opencv` / `hsv_to_rgb_opencv`
reproduce `cv2.cvtColor(..., COLOR_RGB2HSV / COLOR_HSV2RGB)`. mmseg converts BGR images with
COLOR_BGR2HSV, which is the same map on the channel-reversed image, so RGB in -> RGB out is exact.

Randomness: each op draws from its own `sub_seed` stream; parameters are drawn in float64 (the
references draw Python doubles) and rounded to float32 where the reference multiplies a float32 array.
"""
import dataclasses

import tensorflow as tf

from vpd_jax.data import random_ops
from vpd_jax.data.validation import check_non_negative, check_ordered_pair, check_probabilities
from vpd_jax.data.image_ops import clip_to_uint8, round_to_uint8

_HSV_SHIFT = 12
# OpenCV RGB2HSV_b tables: round((255 << 12) / v) and round((180 << 12) / (6 * diff)), 0 at index 0.
_SDIV_TABLE = [0] + [round((255 << _HSV_SHIFT) / v) for v in range(1, 256)]
_HDIV_TABLE_180 = [0] + [round((180 << _HSV_SHIFT) / (6.0 * d)) for d in range(1, 256)]


def rgb_to_hsv_opencv(rgb: tf.Tensor) -> tf.Tensor:
    """uint8 RGB (..., 3) -> uint8 HSV with H in 0..179, bit-exact with OpenCV's fixed-point RGB2HSV_b."""
    r, g, b = tf.unstack(tf.cast(rgb, tf.int32), axis=-1)
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = tf.bitwise.right_shift(diff * tf.gather(_SDIV_TABLE, v) + half, _HSV_SHIFT)
    h = tf.where(tf.equal(v, r), g - b,
                 tf.where(tf.equal(v, g), b - r + 2 * diff, r - g + 4 * diff))
    # Arithmetic shift of a signed int32 (rounds toward -inf), like C's >> on int.
    h = tf.bitwise.right_shift(h * tf.gather(_HDIV_TABLE_180, diff) + half, _HSV_SHIFT)
    h = tf.where(h < 0, h + 180, h)
    return tf.cast(tf.stack([h, s, v], axis=-1), tf.uint8)


# opencv-python's x86-64 wheels run HSV2RGB_b in AVX2 blocks of 4 x 8 float lanes = 32 pixels.
OPENCV_HSV2RGB_BLOCK = 32


def hsv_to_rgb_opencv(hsv: tf.Tensor, simd_block: int = OPENCV_HSV2RGB_BLOCK) -> tf.Tensor:
    """uint8 HSV (H in 0..179) -> uint8 RGB like OpenCV's HSV2RGB_b (float32 sector maths).

    OpenCV (>= 4.1.1, checked on opencv-python-headless 4.10) converts each image row in blocks of
    `simd_block` pixels with vector code that *truncates* the final x * 255, and the last
    width % simd_block pixels of the row with scalar code that *rounds* (half to even). Both evaluate
    `1 - s * h` with a fused multiply-add, reproduced here by computing that term in float64 and
    rounding once. With simd_block=32 (AVX2 dispatch) this matches OpenCV 4.10 bit for bit on all
    180 * 256 * 256 inputs laid out as rows of 256 and of 100 pixels. simd_block=0 gives the rounding
    (scalar) path everywhere. The row axis is axis -2 (width of an (H, W, 3) image).
    """
    h_u8, s_u8, v_u8 = tf.unstack(tf.cast(hsv, tf.float32), axis=-1)
    s = s_u8 * tf.constant(1.0 / 255.0, tf.float32)
    v = v_u8 * tf.constant(1.0 / 255.0, tf.float32)
    h = h_u8 * tf.constant(6.0 / 180.0, tf.float32)
    h = tf.where(h >= 6.0, h - 6.0, h)  # fmod(h, 6) for h <= 255 * 6 / 180
    sector = tf.floor(h)
    frac = h - sector
    sector = tf.cast(sector, tf.int32)

    def one_minus_s_times(x):
        return tf.cast(1.0 - tf.cast(s, tf.float64) * tf.cast(x, tf.float64), tf.float32)

    tab = tf.stack([v, v * (1.0 - s), v * one_minus_s_times(frac), v * one_minus_s_times(1.0 - frac)], axis=-1)
    # OpenCV sector_data gives (b, g, r) indices into tab per sector; stored here as (r, g, b).
    rgb_index = tf.gather(tf.constant([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]]), sector)
    rgb = tf.gather(tab, rgb_index, batch_dims=tab.shape.rank - 1) * 255.0
    rounded = round_to_uint8(rgb)
    if simd_block <= 0:
        return rounded
    width = tf.shape(hsv)[-2]
    vector_path = tf.range(width) < width - width % simd_block
    return tf.where(vector_path[:, tf.newaxis], clip_to_uint8(rgb), rounded)


def mmseg_convert(image_u8: tf.Tensor, alpha=1.0, beta=0.0) -> tf.Tensor:
    """mmseg `convert`: float32(img) * alpha + beta, clip to [0, 255], truncate to uint8."""
    out = tf.cast(image_u8, tf.float32) * tf.cast(alpha, tf.float32) + tf.cast(beta, tf.float32)
    return clip_to_uint8(out)


def mmseg_saturation(image: tf.Tensor, alpha) -> tf.Tensor:
    """mmseg saturation: OpenCV HSV, S -> convert(S, alpha), back to RGB."""
    h, s, v = tf.unstack(rgb_to_hsv_opencv(image), axis=-1)
    return hsv_to_rgb_opencv(tf.stack([h, mmseg_convert(s, alpha), v], axis=-1))


def mmseg_hue(image: tf.Tensor, delta) -> tf.Tensor:
    """mmseg hue: OpenCV HSV, H -> (H + delta) mod 180 (integer delta), back to RGB."""
    h, s, v = tf.unstack(rgb_to_hsv_opencv(image), axis=-1)
    h = tf.cast(tf.math.floormod(tf.cast(h, tf.int32) + tf.cast(delta, tf.int32), 180), tf.uint8)
    return hsv_to_rgb_opencv(tf.stack([h, s, v], axis=-1))


def _apply_with_prob(seed, name: str, prob: float, fn, image):
    """`fn(image, param_seed)` with probability `prob` (own coin stream), else `image` unchanged."""
    apply = random_ops.bernoulli(random_ops.sub_seed(seed, name + "/apply"), prob)
    param_seed = random_ops.sub_seed(seed, name + "/param")
    return tf.cond(apply, lambda: fn(image, param_seed), lambda: image)


@dataclasses.dataclass(frozen=True)
class MMSegPhotometricConfig:
    """mmseg 0.30 PhotoMetricDistortion; defaults are mmseg's (docs/reference.md, "Segmentation training data").

    hue_delta: the shift is numpy `randint(-hue_delta, hue_delta)`, i.e. in [-hue_delta, hue_delta - 1].
    Set a probability to 0 to disable that op.
    """
    brightness_delta: float = 32.0
    brightness_prob: float = 0.5
    contrast_range: tuple[float, float] = (0.5, 1.5)
    contrast_prob: float = 0.5
    saturation_range: tuple[float, float] = (0.5, 1.5)
    saturation_prob: float = 0.5
    hue_delta: int = 18
    hue_prob: float = 0.5

    def __post_init__(self):
        check_probabilities(self, "brightness_prob", "contrast_prob", "saturation_prob", "hue_prob")
        check_ordered_pair(self, "contrast_range", low=0.0)
        check_ordered_pair(self, "saturation_range", low=0.0)
        check_non_negative(self, "brightness_delta")
        if not 0 <= self.hue_delta <= 179:
            raise ValueError(f"MMSegPhotometricConfig.hue_delta must be in [0, 179], got {self.hue_delta}")


def mmseg_photometric_distortion(image: tf.Tensor, seed: tf.Tensor, cfg: MMSegPhotometricConfig) -> tf.Tensor:
    """uint8 RGB -> uint8 RGB. Order: brightness, [contrast if mode == 1], saturation, hue,
    [contrast if mode == 0], mode ~ randint(2); each op with its own probability."""

    def brightness(img, s):
        return mmseg_convert(img, beta=random_ops.uniform(s, -cfg.brightness_delta, cfg.brightness_delta))

    def contrast(img, s):
        return mmseg_convert(img, alpha=random_ops.uniform(s, *cfg.contrast_range))

    def saturation(img, s):
        return mmseg_saturation(img, random_ops.uniform(s, *cfg.saturation_range))

    def hue(img, s):
        return mmseg_hue(img, random_ops.randint(s, -cfg.hue_delta, cfg.hue_delta) if cfg.hue_delta > 0 else 0)

    image = _apply_with_prob(seed, "brightness", cfg.brightness_prob, brightness, image)
    contrast_last = tf.equal(random_ops.randint(random_ops.sub_seed(seed, "contrast_mode"), 0, 2), 0)
    image = tf.cond(contrast_last, lambda: image,
                    lambda: _apply_with_prob(seed, "contrast", cfg.contrast_prob, contrast, image))
    image = _apply_with_prob(seed, "saturation", cfg.saturation_prob, saturation, image)
    image = _apply_with_prob(seed, "hue", cfg.hue_prob, hue, image)
    return tf.cond(contrast_last,
                   lambda: _apply_with_prob(seed, "contrast", cfg.contrast_prob, contrast, image),
                   lambda: image)


@dataclasses.dataclass(frozen=True)
class AlbumentationsPhotometricConfig:
    """The depth colour augmentations: albumentations 1.1-1.3 defaults as GLPDepth/VPD use them
    (docs/reference.md, "Depth training data"). Limits are symmetric: brightness/contrast/sat/val/hue shifts are
    drawn in [-limit, limit]; gamma in gamma_limit / 100. Set a probability to 0 to disable an op."""
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    brightness_by_max: bool = True
    brightness_contrast_prob: float = 0.5
    gamma_limit: tuple[float, float] = (80.0, 120.0)
    gamma_prob: float = 0.5
    hue_shift_limit: float = 20.0
    sat_shift_limit: float = 30.0
    val_shift_limit: float = 20.0
    hue_saturation_value_prob: float = 0.5

    def __post_init__(self):
        check_probabilities(self, "brightness_contrast_prob", "gamma_prob", "hue_saturation_value_prob")
        check_ordered_pair(self, "gamma_limit", low=0.0)
        check_non_negative(self, "brightness_limit", "contrast_limit", "hue_shift_limit", "sat_shift_limit",
                           "val_shift_limit")


def _apply_lut(image_u8: tf.Tensor, lut_u8: tf.Tensor) -> tf.Tensor:
    """cv2.LUT: replace every value v by lut[v]."""
    return tf.gather(lut_u8, tf.cast(image_u8, tf.int32))


def brightness_contrast(image: tf.Tensor, alpha, beta, by_max: bool) -> tf.Tensor:
    """albumentations `brightness_contrast_adjust` on uint8: LUT of float32 v * alpha + beta * 255
    (by_max) or + alpha * beta * mean(image), clipped and truncated."""
    lut = tf.range(256, dtype=tf.float32) * tf.cast(alpha, tf.float32)
    offset = beta * 255.0 if by_max else alpha * beta * tf.reduce_mean(tf.cast(image, tf.float64))
    return _apply_lut(image, clip_to_uint8(lut + tf.cast(offset, tf.float32)))


def gamma(image: tf.Tensor, gamma_value) -> tf.Tensor:
    """albumentations `gamma_transform` on uint8: LUT (i * (1/255)) ** gamma * 255 in float64, truncated."""
    x = tf.range(256, dtype=tf.float64) * (1.0 / 255.0)
    return _apply_lut(image, clip_to_uint8(tf.pow(x, tf.cast(gamma_value, tf.float64)) * 255.0))


def shift_hsv(image: tf.Tensor, hue_shift, sat_shift, val_shift) -> tf.Tensor:
    """albumentations `_shift_hsv_uint8`: OpenCV HSV, H -> floor((H + dh) mod 180), S and V ->
    clip(x + d) truncated, back to RGB."""
    h, s, v = tf.unstack(tf.cast(rgb_to_hsv_opencv(image), tf.float64), axis=-1)
    h = tf.math.floormod(h + tf.cast(hue_shift, tf.float64), 180.0)
    s = s + tf.cast(sat_shift, tf.float64)
    v = v + tf.cast(val_shift, tf.float64)
    return hsv_to_rgb_opencv(clip_to_uint8(tf.stack([h, s, v], axis=-1)))


def albumentations_photometric(image: tf.Tensor, seed: tf.Tensor, cfg: AlbumentationsPhotometricConfig) -> tf.Tensor:
    """uint8 RGB -> uint8 RGB: RandomBrightnessContrast, RandomGamma, HueSaturationValue, in that order."""

    def bc(img, s):
        alpha = 1.0 + random_ops.uniform(random_ops.sub_seed(s, "contrast"), -cfg.contrast_limit, cfg.contrast_limit)
        beta = random_ops.uniform(random_ops.sub_seed(s, "brightness"), -cfg.brightness_limit, cfg.brightness_limit)
        return brightness_contrast(img, alpha, beta, cfg.brightness_by_max)

    def gm(img, s):
        return gamma(img, random_ops.uniform(s, *cfg.gamma_limit) / 100.0)

    def hsv(img, s):
        shifts = [random_ops.uniform(random_ops.sub_seed(s, name), -limit, limit)
                  for name, limit in (("hue", cfg.hue_shift_limit), ("sat", cfg.sat_shift_limit),
                                      ("val", cfg.val_shift_limit))]
        return shift_hsv(img, *shifts)

    image = _apply_with_prob(seed, "brightness_contrast", cfg.brightness_contrast_prob, bc, image)
    image = _apply_with_prob(seed, "gamma", cfg.gamma_prob, gm, image)
    return _apply_with_prob(seed, "hue_saturation_value", cfg.hue_saturation_value_prob, hsv, image)

