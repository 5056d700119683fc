"""Tests for vpd_jax.data.transforms / photometric / image_ops: geometry alignment, reference rules
(mmseg, GLPDepth/albumentations, LAVT, CLIPSeg), OpenCV/PIL/PyTorch numerics, stateless determinism
and tf.data iterator checkpointing."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vpd_jax.data import image_ops, photometric, random_ops
from vpd_jax.data import transforms as T

NO_MMSEG_PHOTOMETRIC = T.MMSegPhotometricConfig(brightness_prob=0.0, contrast_prob=0.0, saturation_prob=0.0,
                                                hue_prob=0.0)
ALL_MMSEG_PHOTOMETRIC = T.MMSegPhotometricConfig(brightness_prob=1.0, contrast_prob=1.0, saturation_prob=1.0,
                                                 hue_prob=1.0)
NO_ALBU_PHOTOMETRIC = T.AlbumentationsPhotometricConfig(brightness_contrast_prob=0.0, gamma_prob=0.0,
                                                        hue_saturation_value_prob=0.0)
ALL_ALBU_PHOTOMETRIC = T.AlbumentationsPhotometricConfig(brightness_contrast_prob=1.0, gamma_prob=1.0,
                                                         hue_saturation_value_prob=1.0)


def seed(i, j=0):
    return tf.constant([i, j], tf.int64)


IMAGE_SPEC = tf.TensorSpec([None, None, 3], tf.uint8)
MAP_SPEC = tf.TensorSpec([None, None], tf.uint8)
SEED_SPEC = tf.TensorSpec([2], tf.int64)


def traced(transform, cfg, *specs):
    """One tf.function per (transform, config), traced once for any input size: tracing a whole
    augmentation graph costs seconds, running it milliseconds."""
    return tf.function(lambda *args: transform(*args, cfg), input_signature=list(specs) + [SEED_SPEC])


def block_labels(rng, grid_hw, block, num_classes=150):
    """Raw ADE-style labels (1..num_classes) constant on block x block squares, and an RGB image whose
    three channels all equal the label, so any resize/crop/flip of the pair can be checked for alignment."""
    grid = rng.integers(1, num_classes + 1, grid_hw)
    label = np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)
    return np.repeat(label[:, :, None], 3, axis=2), label


def denormalise(image):
    return np.rint((np.asarray(image) + 1.0) * 127.5).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# numpy references (written from the OpenCV / albumentations / mmseg sources)
# --------------------------------------------------------------------------------------------------

def np_rgb_to_hsv_opencv(rgb):
    """OpenCV RGB2HSV_b: fixed point with 12-bit tables, H in 0..179."""
    rgb = rgb.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.max(rgb, axis=-1)
    diff = v - np.min(rgb, axis=-1)
    i = np.arange(256)
    sdiv = np.where(i > 0, np.rint((255 << 12) / np.maximum(i, 1)), 0).astype(np.int64)
    hdiv = np.where(i > 0, np.rint((180 << 12) / (6.0 * np.maximum(i, 1))), 0).astype(np.int64)
    s = (diff * sdiv[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


def np_hsv_to_rgb_opencv(hsv, simd_block=32):
    """OpenCV HSV2RGB_b: float32 sector maths with fused 1 - s*h; vector blocks of a row truncate,
    the row tail rounds."""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    h = np.where(h >= 6, h - f32(6), h).astype(f32)
    sector = np.floor(h).astype(np.int64)
    frac = (h - sector).astype(f32)

    def fused(x):
        return (1.0 - s.astype(np.float64) * x.astype(np.float64)).astype(f32)

    tab = [v, v * (f32(1) - s), v * fused(frac), v * fused(f32(1) - frac)]
    bgr_from_sector = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    tab = np.stack(tab, -1)
    bgr = np.take_along_axis(tab, bgr_from_sector[sector], axis=-1)
    rgb = bgr[..., ::-1] * f32(255)
    width = hsv.shape[-2]
    vector = np.arange(width) < width - width % simd_block
    out = np.where(vector[:, None], np.trunc(rgb), np.rint(rgb))
    return np.clip(out, 0, 255).astype(np.uint8)


def np_mmseg_convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def np_albu_shift_hsv(img, hue_shift, sat_shift, val_shift):
    hsv = np_rgb_to_hsv_opencv(img)
    lut = np.arange(256, dtype=np.int16)
    hue = np.mod(lut + hue_shift, 180).astype(np.uint8)[hsv[..., 0]]
    sat = np.clip(lut + sat_shift, 0, 255).astype(np.uint8)[hsv[..., 1]]
    val = np.clip(lut + val_shift, 0, 255).astype(np.uint8)[hsv[..., 2]]
    return np_hsv_to_rgb_opencv(np.stack([hue, sat, val], -1))


# --------------------------------------------------------------------------------------------------
# OpenCV HSV and the photometric ops
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colours():
    rng = np.random.default_rng(0)
    special = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 0, 0],
                        [255, 254, 254], [128, 128, 128], [0, 1, 1], [254, 255, 0]], np.uint8)
    random = rng.integers(0, 256, (200 * 100 - len(special), 3), dtype=np.uint8)
    return np.concatenate([special, random]).reshape(200, 100, 3)   # rows of 100: 96 vector + 4 tail


def test_rgb_to_hsv_matches_opencv_reference(colours):
    np.testing.assert_array_equal(photometric.rgb_to_hsv_opencv(colours).numpy(), np_rgb_to_hsv_opencv(colours))


def test_hsv_to_rgb_matches_opencv_reference_on_every_hue():
    rng = np.random.default_rng(1)
    hsv = np.stack([np.tile(np.arange(180), 60), rng.integers(0, 256, 180 * 60), rng.integers(0, 256, 180 * 60)], -1)
    hsv = hsv.astype(np.uint8).reshape(108, 100, 3)
    np.testing.assert_array_equal(photometric.hsv_to_rgb_opencv(hsv).numpy(), np_hsv_to_rgb_opencv(hsv))
    # The scalar (rounding) path everywhere is a different, also checked, mode.
    np.testing.assert_array_equal(photometric.hsv_to_rgb_opencv(hsv, simd_block=0).numpy(),
                                  np_hsv_to_rgb_opencv(hsv, simd_block=10**9))


def test_hsv_round_trip_is_close_and_exact_on_grey(colours):
    back = photometric.hsv_to_rgb_opencv(photometric.rgb_to_hsv_opencv(colours)).numpy()
    np.testing.assert_array_equal(back, np_hsv_to_rgb_opencv(np_rgb_to_hsv_opencv(colours)))
    assert np.abs(back.astype(int) - colours).max() <= 6   # H has 180 steps, S 256, and truncation
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    np.testing.assert_array_equal(photometric.hsv_to_rgb_opencv(photometric.rgb_to_hsv_opencv(grey)).numpy(),
                                  np.trunc(np.float32(np.arange(256) * np.float32(1 / 255)) * np.float32(255))
                                  [None, :, None].repeat(3, 2).astype(np.uint8))


@pytest.mark.parametrize("alpha", [0.5, 0.83, 1.37])
def test_mmseg_saturation_matches_reference(colours, alpha):
    hsv = np_rgb_to_hsv_opencv(colours)
    hsv[..., 1] = np_mmseg_convert(hsv[..., 1], alpha=alpha)
    np.testing.assert_array_equal(photometric.mmseg_saturation(colours, alpha).numpy(), np_hsv_to_rgb_opencv(hsv))


@pytest.mark.parametrize("delta", [-18, -1, 7, 17])
def test_mmseg_hue_matches_reference(colours, delta):
    hsv = np_rgb_to_hsv_opencv(colours)
    hsv[..., 0] = (hsv[..., 0].astype(int) + delta) % 180
    np.testing.assert_array_equal(photometric.mmseg_hue(colours, delta).numpy(), np_hsv_to_rgb_opencv(hsv))


def test_mmseg_convert_truncates_and_clips():
    x = np.arange(256, dtype=np.uint8)
    for alpha, beta in [(1.0, 17.9), (1.0, -31.2), (0.57, 0.0), (1.43, 0.0)]:
        np.testing.assert_array_equal(photometric.mmseg_convert(x, alpha, beta).numpy(),
                                      np_mmseg_convert(x, alpha, beta))


@pytest.mark.parametrize("shifts", [(13.7, -21.3, 8.2), (-19.9, 29.5, -0.4)])
def test_albumentations_shift_hsv_matches_reference(colours, shifts):
    np.testing.assert_array_equal(photometric.shift_hsv(colours, *shifts).numpy(),
                                  np_albu_shift_hsv(colours, *shifts))


def test_albumentations_gamma_and_brightness_contrast_match_reference(colours):
    for g in (0.8, 0.93, 1.2):
        table = ((np.arange(0, 256.0 / 255, 1.0 / 255) ** g) * 255).astype(np.uint8)
        np.testing.assert_array_equal(photometric.gamma(colours, g).numpy(), table[colours])
    for alpha, beta, by_max in [(1.13, -0.17, True), (0.82, 0.19, True), (1.05, 0.1, False)]:
        lut = np.arange(256).astype("float32")
        lut *= alpha
        lut += beta * 255 if by_max else (alpha * beta) * np.mean(colours)
        lut = np.clip(lut, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(photometric.brightness_contrast(colours, alpha, beta, by_max).numpy(),
                                      lut[colours])


# --------------------------------------------------------------------------------------------------
# Resize helpers
# --------------------------------------------------------------------------------------------------

def np_align_corners(img, out_h, out_w):
    """Direct formula: src = dst * (in - 1) / (out - 1), bilinear, float64."""
    in_h, in_w = img.shape[:2]
    ys = np.arange(out_h) * ((in_h - 1) / (out_h - 1))
    xs = np.arange(out_w) * ((in_w - 1) / (out_w - 1))
    y0 = np.floor(ys).astype(int); x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, in_h - 1); x1 = np.minimum(x0 + 1, in_w - 1)
    wy = (ys - y0)[:, None, None]; wx = (xs - x0)[None, :, None]
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize("in_hw,out_hw", [((37, 53), (24, 24)), ((20, 31), (64, 48)), ((64, 64), (64, 64))])
def test_align_corners_resize_matches_formula(in_hw, out_hw):
    img = np.random.default_rng(2).integers(0, 256, in_hw + (3,)).astype(np.float32)
    out = image_ops.resize_bilinear_align_corners(img, out_hw).numpy()
    np.testing.assert_allclose(out, np_align_corners(img, *out_hw), atol=2e-3)
    np.testing.assert_array_equal(out[[0, 0, -1, -1], [0, -1, 0, -1]], img[[0, 0, -1, -1], [0, -1, 0, -1]])


def test_align_corners_and_legacy_nearest_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (45, 70, 3)).astype(np.float32)
    mask = (rng.random((45, 70)) > 0.5).astype(np.uint8)
    for size in [(32, 32), (96, 96), (45, 140), (30, 35)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size, mode="bilinear",
                                              align_corners=True)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(image_ops.resize_bilinear_align_corners(img, size).numpy(), ref, atol=2e-3)
        ref = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size, mode="nearest")[0, 0].numpy()
        np.testing.assert_array_equal(image_ops.resize_nearest(mask, size, "torch").numpy(), ref)


@pytest.mark.parametrize("in_size,out_size", [(256, 384), (37, 512), (700, 512), (1280, 384), (10, 15)])
def test_pil_nearest_matches_pil(in_size, out_size):
    column = np.arange(in_size, dtype=np.int32) % 256
    mask = np.tile(column[None, :], (3, 1)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(mask, mode="L").resize((out_size, 3), Image.NEAREST))
    np.testing.assert_array_equal(image_ops.resize_nearest(mask, (3, out_size), "pil").numpy(), ref)


def test_opencv_nearest_is_the_legacy_floor_rule():
    src = np.arange(10, dtype=np.int32)[:, None]
    out = image_ops.resize_nearest(src, (15, 1), "opencv").numpy()[:, 0]
    np.testing.assert_array_equal(out, [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9])   # floor(i * 10 / 15)


def test_opencv_bilinear_fixed_point_on_known_values():
    # Exact 2x downscale is OpenCV's INTER_AREA mean with +2 >> 2 rounding; 2x upscale uses 1/4 - 3/4 taps.
    img = np.array([[0, 1, 10, 13], [2, 5, 20, 20]], np.uint8)[:, :, None]
    np.testing.assert_array_equal(image_ops.resize_bilinear_uint8(img, (1, 2)).numpy()[..., 0], [[2, 16]])
    row = np.array([[0, 100, 255]], np.uint8)[:, :, None]
    up = image_ops.resize_bilinear_uint8(row, (1, 6)).numpy()[0, :, 0]
    np.testing.assert_array_equal(up, [0, 25, 75, 139, 216, 255])   # e.g. (100*1536 + 255*512) / 2048 = 138.75


@pytest.mark.parametrize("in_hw,out_hw", [((40, 110), (48, 48)), ((30, 20), (48, 48)), ((90, 130), (90, 64)),
                                          ((48, 64), (20, 64)), ((7, 300), (9, 17))])
def test_pil_bilinear_antialias_matches_pil(in_hw, out_hw):
    # Sizes for which Pillow 13 also runs the horizontal pass first (see resize_bilinear_antialias_uint8).
    img = np.random.default_rng(4).integers(0, 256, in_hw + (3,), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize(out_hw[::-1], Image.BILINEAR))
    np.testing.assert_array_equal(image_ops.resize_bilinear_antialias_uint8(img, out_hw).numpy(), ref)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------

def test_reduce_zero_label():
    raw = tf.constant([0, 1, 2, 150, 255], tf.uint8)
    np.testing.assert_array_equal(T.reduce_zero_label(raw).numpy(), [255, 0, 1, 149, 255])


@pytest.fixture(scope="module")
def seg_pair():
    return block_labels(np.random.default_rng(5), (6, 8), 16)      # 96 x 128


SMALL_SEG = T.SegAugConfig(img_scale=(256, 64), crop_size=(64, 64), photometric=NO_MMSEG_PHOTOMETRIC)
SEG_PHOTO = dataclasses.replace(SMALL_SEG, photometric=T.MMSegPhotometricConfig())
seg_small = traced(T.seg_train, SMALL_SEG, IMAGE_SPEC, MAP_SPEC)
seg_photo = traced(T.seg_train, SEG_PHOTO, IMAGE_SPEC, MAP_SPEC)


def test_seg_train_keeps_image_and_label_aligned(seg_pair):
    image, label = seg_pair
    for i in range(12):
        out = seg_small(image, label, seed(i))
        img, lab = denormalise(out["image"]), out["label"].numpy()
        valid = lab != 255
        assert valid.any()
        # The image's colour is the raw label, the label is reduced by one; away from block edges
        # (bilinear blends neighbours) they must agree. A geometry mismatch agrees on ~1/150 pixels.
        agree = np.mean(img[..., 0][valid] - 1 == lab[valid])
        assert agree > 0.8, (i, agree)
    assert lab.dtype == np.int32 and out["image"].dtype == tf.float32


def test_seg_train_pads_image_with_zero_and_label_with_255():
    rng = np.random.default_rng(6)
    image, label = block_labels(rng, (5, 6), 8)                     # 40 x 48, no resize at ratio 1
    cfg = dataclasses.replace(SMALL_SEG, img_scale=(48, 40), ratio_range=(1.0, 1.0), flip_prob=0.0)
    out = T.seg_train(image, label, seed(0), cfg)
    img, lab = out["image"].numpy(), out["label"].numpy()
    assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
    np.testing.assert_array_equal(img[40:], 0.0)
    np.testing.assert_array_equal(img[:, 48:], 0.0)
    np.testing.assert_array_equal(lab[40:], 255)
    np.testing.assert_array_equal(lab[:, 48:], 255)
    np.testing.assert_array_equal(lab[:40, :48], label.astype(np.int32) - 1)
    np.testing.assert_allclose(img[:40, :48], (image.astype(np.float32) - 127.5) / 127.5, atol=2e-7)


def crop_candidates(label, s, cfg):
    """The crop offsets `seg_train` draws for seed s (its "crop_y" / "crop_x" streams)."""
    crop_h, crop_w = cfg.crop_size
    n = cfg.crop_max_tries + 1
    ys = random_ops.randint(random_ops.sub_seed(s, "crop_y"), 0, max(label.shape[0] - crop_h, 0) + 1, [n]).numpy()
    xs = random_ops.randint(random_ops.sub_seed(s, "crop_x"), 0, max(label.shape[1] - crop_w, 0) + 1, [n]).numpy()
    return ys, xs


def mmseg_crop_choice(label, s, cfg):
    """The mmseg RandomCrop loop replayed on those candidates."""
    crop_h, crop_w = cfg.crop_size
    ys, xs = crop_candidates(label, s, cfg)
    for i in range(cfg.crop_max_tries):
        crop = label[ys[i]:ys[i] + crop_h, xs[i]:xs[i] + crop_w]
        labels, counts = np.unique(crop, return_counts=True)
        counts = counts[labels != cfg.ignore_index]
        if len(counts) > 1 and np.max(counts) / np.sum(counts) < cfg.cat_max_ratio:
            return ys[i], xs[i]
    return ys[-1], xs[-1]


def crop_rule_ok(crop, ratio=0.75):
    labels, counts = np.unique(crop, return_counts=True)
    counts = counts[labels != 255]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_seg_crop_honours_cat_max_ratio():
    # Mostly class 1 with one small patch of class 2: only crops over the patch pass the rule.
    label = np.ones((64, 160), np.uint8)
    label[20:44, 70:90] = 2
    image = np.zeros((64, 160, 3), np.uint8)
    cfg = T.SegAugConfig(img_scale=(160, 64), ratio_range=(1.0, 1.0), crop_size=(32, 32), flip_prob=0.0,
                         photometric=NO_MMSEG_PHOTOMETRIC)
    reduced = T.reduce_zero_label(label).numpy()
    fn = traced(T.seg_train, cfg, IMAGE_SPEC, MAP_SPEC)
    ok_with = ok_without = 0
    for i in range(30):
        crop = fn(image, label, seed(i))["label"].numpy()
        y, x = mmseg_crop_choice(reduced, seed(i), cfg)
        np.testing.assert_array_equal(crop, reduced[y:y + 32, x:x + 32])
        ok_with += crop_rule_ok(crop)
        ys, xs = crop_candidates(reduced, seed(i), cfg)              # without the rule: the first draw
        ok_without += crop_rule_ok(reduced[ys[0]:ys[0] + 32, xs[0]:xs[0] + 32])
    assert ok_with >= 26 and ok_without <= 15, (ok_with, ok_without)


def test_seg_crop_without_valid_crop_keeps_a_crop():
    label = np.full((50, 70), 3, np.uint8)        # one class everywhere: every try fails
    cfg = T.SegAugConfig(img_scale=(70, 50), ratio_range=(1.0, 1.0), crop_size=(32, 32))
    out = T.seg_train(np.zeros((50, 70, 3), np.uint8), label, seed(1), cfg)
    np.testing.assert_array_equal(out["label"].numpy(), 2)


def test_seg_flip_probability_is_configurable():
    image = np.random.default_rng(7).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    label = np.ones((16, 24), np.uint8)
    cfg = T.SegAugConfig(img_scale=(24, 16), ratio_range=(1.0, 1.0), crop_size=(16, 24),
                         photometric=NO_MMSEG_PHOTOMETRIC)
    fn = traced(T.seg_train, cfg, IMAGE_SPEC, MAP_SPEC)

    def flipped(out):
        img = denormalise(out["image"])
        assert np.array_equal(img, image) or np.array_equal(img, image[:, ::-1])
        return np.array_equal(img, image[:, ::-1])

    assert 0.4 <= np.mean([flipped(fn(image, label, seed(i))) for i in range(200)]) <= 0.6
    for i in range(2):
        assert not flipped(T.seg_train(image, label, seed(i), dataclasses.replace(cfg, flip_prob=0.0)))
        assert flipped(T.seg_train(image, label, seed(i), dataclasses.replace(cfg, flip_prob=1.0)))


def test_seg_photometric_changes_image_never_label(seg_pair):
    image, label = seg_pair
    changed = 0
    for i in range(4):
        off, on = seg_small(image, label, seed(i)), seg_photo(image, label, seed(i))
        np.testing.assert_array_equal(on["label"], off["label"])
        changed += not np.array_equal(on["image"], off["image"])
        assert np.abs(on["image"]).max() <= 1.0
    always = T.seg_train(image, label, seed(0), dataclasses.replace(SMALL_SEG, photometric=ALL_MMSEG_PHOTOMETRIC))
    np.testing.assert_array_equal(always["label"], seg_small(image, label, seed(0))["label"])
    assert changed >= 2


def test_seg_resize_uses_ratio_range_and_keeps_aspect():
    # With crop larger than any resized image, the unpadded region is the resized image itself.
    image, label = block_labels(np.random.default_rng(8), (4, 6), 10)    # 40 x 60
    cfg = T.SegAugConfig(img_scale=(120, 30), ratio_range=(0.5, 2.0), crop_size=(128, 256),
                         photometric=NO_MMSEG_PHOTOMETRIC)
    for i in range(3):
        lab = T.seg_train(image, label, seed(i), cfg)["label"].numpy()
        h = int((lab != 255).any(axis=1).sum()); w = int((lab != 255).any(axis=0).sum())
        ratio = random_ops.uniform(random_ops.sub_seed(seed(i), "resize_ratio"), 0.5, 2.0).numpy()
        long_edge, short_edge = int(120 * ratio), int(30 * ratio)
        factor = min(long_edge / 60, short_edge / 40)
        assert (h, w) == (int(40 * factor + 0.5), int(60 * factor + 0.5))


def test_seg_eval_resizes_image_only():
    image, label = block_labels(np.random.default_rng(9), (4, 6), 10)    # 40 x 60
    cfg = T.SegAugConfig(img_scale=(128, 32))
    out = T.seg_eval(image, label, cfg)
    assert out["image"].shape == (32, 48, 3)                            # short side -> 32
    np.testing.assert_array_equal(out["label"].numpy(), label.astype(np.int32) - 1)
    wide = np.zeros((20, 200, 3), np.uint8)
    assert T.seg_eval(wide, np.ones((20, 200), np.uint8), cfg)["image"].shape == (13, 128, 3)  # long side capped


# --------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------

DEPTH_H, DEPTH_W = 24, 40
SMALL_DEPTH = T.DepthAugConfig(crop_size=(24, 24), cutdepth_prob=0.0, photometric=NO_ALBU_PHOTOMETRIC)
DEPTH_SPEC = tf.TensorSpec([None, None], tf.float32)
depth_small = traced(T.depth_train, SMALL_DEPTH, IMAGE_SPEC, DEPTH_SPEC)


@pytest.fixture(scope="module")
def depth_pair():
    """Image channels encode (column, row); depth in metres is a known function of (row, column)."""
    rows, cols = np.mgrid[:DEPTH_H, :DEPTH_W]
    image = np.stack([cols, rows, np.full_like(cols, 77)], -1).astype(np.uint8)
    depth = ((rows * DEPTH_W + cols) * 0.0123 + 0.5).astype(np.float32)
    return image, depth


def test_depth_train_keeps_depth_aligned_and_in_metres(depth_pair):
    image, depth = depth_pair
    flipped = 0
    for i in range(16):
        out = depth_small(image, depth, seed(i))
        img, dep = denormalise(out["image"]), out["depth"].numpy()
        assert img.shape == (24, 24, 3) and dep.shape == (24, 24) and dep.dtype == np.float32
        np.testing.assert_array_equal(dep, depth[img[..., 1], img[..., 0]])
        flipped += img[0, 0, 0] > img[0, -1, 0]
    assert 3 <= flipped <= 13


def test_depth_photometric_changes_image_never_depth(depth_pair):
    image, depth = depth_pair
    off = depth_small(image, depth, seed(2))
    on = T.depth_train(image, depth, seed(2), dataclasses.replace(SMALL_DEPTH, photometric=ALL_ALBU_PHOTOMETRIC))
    np.testing.assert_array_equal(on["depth"], off["depth"])
    assert not np.array_equal(on["image"], off["image"])


def test_cut_depth_writes_wrapped_millimetres_in_one_strip_only():
    rng = np.random.default_rng(10)
    depth = (rng.integers(300, 9000, (DEPTH_H, 64)) / 1000.0).astype(np.float32)   # whole millimetres
    image = np.full((DEPTH_H, 64, 3), 3, np.uint8)
    expected = (np.rint(depth.astype(np.float64) * 1000).astype(np.int64) % 256).astype(np.uint8)
    cfg = T.DepthAugConfig(cutdepth_prob=1.0)
    fn = tf.function(lambda s: T.cut_depth(image, depth, s, cfg))
    starts = []
    for i in range(30):
        out = fn(seed(i)).numpy()
        # Every column either holds the wrapped millimetres in all 3 channels or is untouched, and
        # the written columns form one contiguous strip.
        strip = (out == expected[:, :, None]).all(axis=(0, 2))
        untouched = (out == image).all(axis=(0, 2))
        assert np.all(strip | untouched)
        cols = np.nonzero(~untouched)[0]
        assert len(cols) >= 1 and np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))
        left = cols[0]
        assert len(cols) <= max((64 - left) * 0.75, 1) + 1
        starts.append(left)
    assert min(starts) < 16 and max(starts) > 40


def test_cut_depth_probability_and_scaled_variant():
    depth = np.full((8, 32), 4.0, np.float32)
    image = np.zeros((8, 32, 3), np.uint8)
    fn = tf.function(lambda s: T.cut_depth(image, depth, s, T.DepthAugConfig()))
    applied = np.mean([fn(seed(i)).numpy().any() for i in range(200)])
    assert 0.17 <= applied <= 0.33
    scaled = T.cut_depth(image, depth, seed(0), T.DepthAugConfig(cutdepth_prob=1.0, cutdepth_uint8_wrap=False)).numpy()
    assert set(np.unique(scaled)) == {0, 102}                          # round(4 / 10 * 255)
    wrapped = T.cut_depth(image, depth, seed(0), T.DepthAugConfig(cutdepth_prob=1.0)).numpy()
    assert set(np.unique(wrapped)) == {0, 4000 % 256}


def test_depth_eval_is_normalisation_only(depth_pair):
    image, depth = depth_pair
    out = T.depth_eval(image, depth)
    np.testing.assert_array_equal(out["depth"], depth)
    np.testing.assert_allclose(out["image"], image / 255.0 * 2 - 1, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Referring segmentation and PhraseCut
# --------------------------------------------------------------------------------------------------

def test_refer_matches_pil_resize():
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(11)
    image = np.clip(gaussian_filter(rng.uniform(0, 255, (40, 110, 3)), (2, 2, 0)) * 4 - 382, 0, 255).astype(np.uint8)
    mask = np.zeros((40, 110), np.uint8)
    mask[10:30, 30:95] = 1
    out = T.refer(image, mask, T.ReferConfig(size=48))
    ref_img = np.asarray(Image.fromarray(image).resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(denormalise(out["image"]), ref_img)
    np.testing.assert_allclose(out["image"], (ref_img / 255.0 - 0.5) / 0.5, atol=2e-7)   # LAVT's Normalize
    pil_mask = Image.fromarray(mask, mode="P")
    np.testing.assert_array_equal(out["mask"].numpy(), np.asarray(pil_mask.resize((48, 48), Image.BILINEAR)))
    assert out["mask"].dtype == tf.int32


def test_refer_rejects_non_binary_mask():
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask values must be 0 or 1"):
        T.refer(np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8), T.ReferConfig(size=4))


def column_image(h, w):
    cols = np.tile(np.arange(w)[None, :], (h, 1))
    return np.stack([cols % 256, cols // 256, np.zeros_like(cols)], -1).astype(np.uint8)


phrasecut_40 = traced(T.phrasecut_train, T.PhraseCutConfig(size=40), IMAGE_SPEC, MAP_SPEC)


def test_phrasecut_crop_is_square_and_meets_foreground_rule():
    # side = min(h, w) = 40 = size: the resize is the identity, so the crop can be read off the image.
    h, w = 40, 100
    image = column_image(h, w)
    mask = np.zeros((h, w), np.uint8)
    mask[5:35, 62:90] = 1                       # 840 px > 0.05 * 40 * 100 = 200 in crops with x0 >= 29
    offsets = []
    for i in range(20):
        out = phrasecut_40(image, mask, seed(i))
        img = denormalise(out["image"])
        x0 = int(img[0, 0, 0])
        np.testing.assert_array_equal(img[..., 0], np.tile(np.arange(x0, x0 + 40), (40, 1)))   # square crop
        np.testing.assert_array_equal(out["mask"].numpy()[..., 0], mask[:, x0:x0 + 40])
        assert mask[:, x0:x0 + 40].sum() > 200
        offsets.append(x0)
    assert len(set(offsets)) > 5


def test_phrasecut_crop_falls_back_to_most_foreground():
    image = column_image(40, 100)
    mask = np.zeros((40, 100), np.uint8)
    mask[3:4, 90:95] = 1                         # 5 px: no crop passes the 5% rule
    for i in range(10):
        assert phrasecut_40(image, mask, seed(i))["mask"].numpy().sum() == 5   # best of 50 draws: x0 in 55..60


def test_phrasecut_eval_squashes_and_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    grey = rng.integers(0, 256, (30, 50, 1), dtype=np.uint8)
    mask = (rng.random((30, 50)) > 0.6).astype(np.uint8)
    out = T.phrasecut_eval(grey, mask, T.PhraseCutConfig(size=24))
    rgb = torch.from_numpy(np.repeat(grey, 3, 2)).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(rgb, (24, 24), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
    np.testing.assert_allclose(out["image"].numpy(), (ref.numpy() / 255) * 2 - 1, atol=2e-5)
    ref_mask = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], (24, 24), mode="nearest")
    np.testing.assert_array_equal(out["mask"].numpy(), ref_mask[0].permute(1, 2, 0).numpy().astype(np.float32))


prompt_fn = traced(T.phrasecut_prompt, T.PhraseCutConfig(), tf.TensorSpec([], tf.string))


def test_phrasecut_prompt_templates():
    cfg = T.PhraseCutConfig()
    prompts = [prompt_fn("red {cube}", seed(i)).numpy().decode() for i in range(270)]
    expected = [t.replace("{}", "red {cube}") for t in T.PHRASECUT_TEMPLATES]
    counts = [prompts.count(p) for p in expected]
    assert sum(counts) == 270 and min(counts) >= 15 and max(counts) <= 50, counts
    fixed = T.phrasecut_prompt(tf.constant("dog"), seed(5), dataclasses.replace(cfg, fixed_template="{}."))
    assert fixed.numpy() == b"dog."


# --------------------------------------------------------------------------------------------------
# Determinism, tf.data, checkpointing, configs
# --------------------------------------------------------------------------------------------------

def test_same_seed_same_output_different_seed_different_output(seg_pair, depth_pair):
    image, label = seg_pair
    d_image, depth = depth_pair
    mask = (label > 75).astype(np.uint8)
    cut = traced(T.cut_depth, T.DepthAugConfig(cutdepth_prob=0.5), IMAGE_SPEC, DEPTH_SPEC)
    cases = {
        "seg": lambda s: seg_photo(image, label, s),
        "depth": lambda s: depth_small(d_image, depth, s),
        "cut_depth": lambda s: {"image": cut(d_image, depth, s)},
        "phrasecut": lambda s: phrasecut_40(image[:40], mask[:40], s),
        "prompt": lambda s: {"prompt": prompt_fn("x", s)},
    }
    for name, fn in cases.items():
        a, b = fn(seed(7, 3)), fn(seed(7, 3))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=name)
        outputs = [fn(seed(i, 3)) for i in range(8)]
        distinct = {tuple(np.asarray(o[k]).tobytes() for k in sorted(o)) for o in outputs}
        assert len(distinct) > 1, name
    # int32 seeds give the same streams as the equal int64 seeds.
    int32_seed = T.phrasecut_prompt(tf.constant("x"), tf.constant([7, 3], tf.int32))
    assert int32_seed.numpy() == prompt_fn("x", seed(7, 3)).numpy()


def test_tf_data_pipeline_is_deterministic_and_checkpointable(seg_pair, tmp_path):
    image, label = seg_pair
    data = tf.data.Dataset.from_tensors((image, label)).repeat(6)
    seeds = tf.data.Dataset.random(seed=123).batch(2)            # one (2,) seed per element
    # The transform is called directly in the map (not through a tf.function, whose call op is
    # stateful and would make the iterator unsaveable).
    ds = tf.data.Dataset.zip((data, seeds)).map(lambda pair, s: T.seg_train(pair[0], pair[1], s, SEG_PHOTO),
                                                num_parallel_calls=2).batch(2)
    first = [b["image"].numpy() for b in ds]
    second = [b["image"].numpy() for b in ds]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0], first[0][1])               # per-element seeds differ
    iterator = iter(ds)
    next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))   # fails on stateful RNG ops
    expected = next(iterator)
    restored = iter(ds)
    tf.train.Checkpoint(iterator=restored).read(path)
    got = next(restored)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_array_equal(expected["image"], first[1])


def test_other_transforms_run_in_tf_data(depth_pair):
    image, depth = depth_pair
    ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensors((image, depth)).repeat(2),
                              tf.data.Dataset.random(seed=1).batch(2)))
    out = list(ds.map(lambda pair, s: T.depth_train(pair[0], pair[1], s, SMALL_DEPTH)).batch(2))   # traces in-map
    assert out[0]["image"].shape == (2, 24, 24, 3)
    masks = tf.data.Dataset.from_tensors((image, (depth > 5).astype(np.uint8))).repeat(2)
    out = list(masks.map(lambda im, m: T.refer(im, m, T.ReferConfig(size=16))).batch(2))
    assert out[0]["mask"].shape == (2, 16, 16)


@pytest.mark.parametrize("make,field", [
    (lambda: T.SegAugConfig(flip_prob=1.5), "flip_prob"),
    (lambda: T.SegAugConfig(crop_size=(0, 512)), "crop_size"),
    (lambda: T.SegAugConfig(ratio_range=(2.0, 0.5)), "ratio_range"),
    (lambda: T.DepthAugConfig(cutdepth_prob=-0.1), "cutdepth_prob"),
    (lambda: T.MMSegPhotometricConfig(hue_prob=2.0), "hue_prob"),
    (lambda: T.AlbumentationsPhotometricConfig(gamma_limit=(120.0, 80.0)), "gamma_limit"),
    (lambda: T.PhraseCutConfig(fixed_template="no placeholder"), "no placeholder"),
    (lambda: T.ReferConfig(size=0), "size"),
])
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="uint8"):
        T.seg_train(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), seed(0))
    with pytest.raises(ValueError, match=r"seed must have shape \(2,\)"):
        T.seg_train(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), tf.constant([1, 2, 3], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image and map sizes differ"):
        T.seg_eval(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than crop_size"):
        T.depth_train(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), seed(0))
