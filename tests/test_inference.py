"""Inference helpers against direct transcriptions of the references (mmseg 0.30 slide/aug test, VPD depth test),
and the padded-batch variants against the static functions on each unpadded image.

Fake models are exact in float32 where a test claims exact equality: images hold small integers and the logits
are integer combinations of pixel values, window-local coordinates and a per-window constant, so every sum is
exact and only the division by the coverage count rounds (identically in numpy and XLA).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpd_jax import inference

C = 4  # classes of the fake segmentation models


# ----------------------------------------------------------------------------------- reference transcriptions

def reference_windows(h, w, crop, stride):
    """mmseg slide_inference's loop (docs/reference.md, "Segmentation test protocol"), verbatim in structure."""
    (ch, cw), (sh, sw) = crop, stride
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out.append((y1, y2, x1, x2))
    return out


def reference_slide(model, img, crop, stride):
    """mmseg slide_inference on a numpy NHWC image, the model run on each (possibly smaller) crop directly."""
    b, h, w, _ = img.shape
    preds = np.zeros((b, h, w, C), np.float32)
    count = np.zeros((b, h, w, 1), np.float32)
    for y1, y2, x1, x2 in reference_windows(h, w, crop, stride):
        preds += np.pad(model(img[:, y1:y2, x1:x2]), [(0, 0), (y1, h - y2), (x1, w - x2), (0, 0)])
        count[:, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return preds / count


def fake_seg_model(xp):
    """Logits from the pixel, its window-local position and the window's bottom-right pixel: exact integers,
    different for overlapping windows (so averaging is visible) and dependent on any padding of the window.
    Works on numpy and jax arrays."""
    def model(crops):
        n, h, w, _ = crops.shape
        y = xp.arange(h, dtype=xp.float32)[None, :, None, None]
        x = xp.arange(w, dtype=xp.float32)[None, None, :, None]
        c = xp.arange(C, dtype=xp.float32)
        corner = crops[:, -1:, -1:, :1]
        return (crops[..., c.astype(int) % 3] * (c + 1) + 3 * y - 2 * x + 5 * c + 7 * corner).astype(xp.float32)
    return model


def integer_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------ window grid

GRID_SIZES = [(13, 19), (8, 8), (5, 3), (6, 19), (13, 7), (9, 9), (17, 8), (8, 21), (1, 1), (30, 31), (16, 13)]


@pytest.mark.parametrize("crop,stride", [((8, 8), (5, 5)), ((8, 6), (5, 4)), ((4, 4), (4, 4)), ((5, 7), (1, 3))])
def test_window_grid_is_the_reference_loop_and_covers_every_pixel(crop, stride):
    for h, w in GRID_SIZES:
        windows = inference.window_grid((h, w), crop, stride)
        assert windows == reference_windows(h, w, crop, stride), (h, w)
        ref_count = np.zeros((h, w), np.float32)
        for y1, y2, x1, x2 in windows:
            assert y2 - y1 == min(crop[0], h) and x2 - x1 == min(crop[1], w)  # one static crop size per image
            ref_count[y1:y2, x1:x2] += 1
        count = inference.coverage_count((h, w), windows)
        np.testing.assert_array_equal(count, ref_count)
        assert count.min() >= 1, (h, w)


def test_window_grid_at_the_reference_scale():
    # 512 x 683 (a 4:3 ADE20K image at short side 512): one row, two columns flush with both borders
    assert inference.window_grid((512, 683)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert inference.window_grid((600, 2048))[-1] == (88, 600, 1536, 2048)
    assert len(inference.window_grid((600, 2048))) == 2 * 6


@pytest.mark.parametrize("bad", [0, (8,), (8, -1), (8.0, 8)])
def test_window_grid_rejects_bad_crops(bad):
    with pytest.raises(ValueError, match="crop"):
        inference.window_grid((13, 19), bad, 5)


# -------------------------------------------------------------------------------------- slide inference

@pytest.mark.parametrize("hw", [(13, 19), (8, 8), (16, 13), (6, 19), (5, 3)])
def test_slide_inference_equals_the_reference_exactly(hw):
    img = integer_image((2, *hw, 3))
    want = reference_slide(fake_seg_model(np), img, (8, 8), (5, 5))
    got = inference.slide_inference(fake_seg_model(jnp), jnp.asarray(img), C, 8, 5, small_crop="direct")
    np.testing.assert_array_equal(np.asarray(got), want)


def test_slide_inference_small_crop_modes():
    img = integer_image((1, 6, 19, 3), seed=1)  # 6 rows < crop 8: every window is 6 x 8
    seen = []

    def recording(model):
        def fn(crops):
            seen.append(crops.shape)
            return model(crops)
        return fn

    direct = inference.slide_inference(recording(fake_seg_model(jnp)), jnp.asarray(img), C, 8, 5,
                                       small_crop="direct")
    padded = inference.slide_inference(recording(fake_seg_model(jnp)), jnp.asarray(img), C, 8, 5,
                                       small_crop="pad", pad_value=-3.0)
    assert seen == [(4, 6, 8, 3), (4, 8, 8, 3)]  # 4 windows of the 19 columns
    np.testing.assert_array_equal(np.asarray(direct), reference_slide(fake_seg_model(np), img, (8, 8), (5, 5)))

    # pad: the model sees the crop padded bottom/right with pad_value, and only the real rows come back
    def padded_reference_model(crop):
        pad = np.pad(crop, [(0, 0), (0, 8 - crop.shape[1]), (0, 8 - crop.shape[2]), (0, 0)], constant_values=-3.0)
        return fake_seg_model(np)(pad)[:, :crop.shape[1], :crop.shape[2]]
    np.testing.assert_array_equal(np.asarray(padded), reference_slide(padded_reference_model, img, (8, 8), (5, 5)))

    # a model whose logits depend only on the pixel and its position gives the same result either way
    def pixelwise(xp):
        return lambda crops: fake_seg_model(xp)(crops) - 7 * crops[:, -1:, -1:, :1]
    a = inference.slide_inference(pixelwise(jnp), jnp.asarray(img), C, 8, 5, small_crop="direct")
    b = inference.slide_inference(pixelwise(jnp), jnp.asarray(img), C, 8, 5, small_crop="pad")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="small_crop"):
        inference.slide_inference(pixelwise(jnp), jnp.asarray(img), C, 8, 5, small_crop="crop")


def _torch_resize(x_nhwc, size):
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))
    return np.transpose(F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False).numpy(), (0, 2, 3, 1))


def test_slide_inference_upsamples_low_resolution_logits_like_encode_decode():
    img = integer_image((2, 13, 19, 3), seed=2)

    def quarter(xp):  # logits at a quarter of the crop resolution (rounded up), like a stride-4 head
        return lambda crops: fake_seg_model(xp)(crops)[:, ::4, ::4] * 0.37

    def encode_decode(crop):
        return _torch_resize(quarter(np)(crop), crop.shape[1:3])

    got = inference.slide_inference(quarter(jnp), jnp.asarray(img), C, 8, 5)
    np.testing.assert_allclose(np.asarray(got), reference_slide(encode_decode, img, (8, 8), (5, 5)), rtol=1e-6,
                               atol=1e-5)


def test_slide_inference_checks_the_model_output():
    img = jnp.zeros((1, 13, 19, 3))
    with pytest.raises(ValueError, match=r"\(8, h, w, 5\).*\(8, 8, 8, 4\)"):
        inference.slide_inference(fake_seg_model(jnp), img, 5, 8, 5)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inference.slide_inference(fake_seg_model(jnp), jnp.zeros((13, 19, 3)), C, 8, 5)


def test_slide_inference_under_jit_compiles_once_per_size_and_chunks():
    traced = []

    def model(crops):
        traced.append(crops.shape)
        return fake_seg_model(jnp)(crops)

    run = jax.jit(functools.partial(inference.slide_inference, model, num_classes=C, crop=8, stride=5))
    img_a, img_b = integer_image((2, 13, 19, 3), 3), integer_image((2, 13, 19, 3), 4)
    for img in (img_a, img_b):
        np.testing.assert_array_equal(np.asarray(run(jnp.asarray(img))),
                                      reference_slide(fake_seg_model(np), img, (8, 8), (5, 5)))
    assert traced == [(16, 8, 8, 3)] and run._cache_size() == 1  # 8 windows x 2 images, one compilation
    run(jnp.zeros((2, 9, 9, 3)))
    assert run._cache_size() == 2

    # chunks of 5 crops (16 -> 4 chunks, the last one filled up): same numbers, the model traced once
    traced.clear()
    chunked = jax.jit(functools.partial(inference.slide_inference, model, num_classes=C, crop=8, stride=5,
                                        chunk_size=5))
    np.testing.assert_array_equal(np.asarray(chunked(jnp.asarray(img_a))), np.asarray(run(jnp.asarray(img_a))))
    assert traced == [(5, 8, 8, 3)]
    with pytest.raises(ValueError, match="chunk_size"):
        inference.slide_inference(model, jnp.asarray(img_a), C, 8, 5, chunk_size=0)


def test_whole_inference():
    img = integer_image((2, 13, 19, 3), seed=5)
    got = inference.whole_inference(lambda x: fake_seg_model(jnp)(x)[:, ::2, ::2], jnp.asarray(img), C)
    np.testing.assert_allclose(np.asarray(got), _torch_resize(fake_seg_model(np)(img)[:, ::2, ::2], (13, 19)),
                               rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------- multi-scale + flip

def test_keep_ratio_and_scale_sizes():
    assert inference.keep_ratio_size((480, 640), (2048, 512)) == (512, 683)  # 640 * 16/15 = 682.67
    assert inference.keep_ratio_size((300, 2000), (2048, 512)) == (307, 2048)  # long side limits
    assert inference.keep_ratio_size((512, 512), (2048, 512)) == (512, 512)
    # mmseg aug-test scales: (int(2048 r), int(512 r)) -> keep ratio of the original 480 x 640 image
    assert inference.scale_sizes((480, 640), inference.AUG_TEST_RATIOS) == [
        (512, 683), (576, 768), (640, 853), (704, 939), (768, 1024)]


def reference_aug_test(model, img, original_hw, ratios, flip, img_scale, crop, stride):
    """mmseg MultiScaleFlipAug + aug_test with torch resizes: per ratio the keep-ratio size of the original,
    bilinear resize of the image, then (no flip, flip) passes of slide inference -> resize to the original
    size -> softmax -> flip back; probabilities summed in pass order and divided by the pass count."""
    h0, w0 = original_hw
    total, n = None, 0
    for r in ratios:
        long_edge, short_edge = max(int(img_scale[0] * r), int(img_scale[1] * r)), min(int(img_scale[0] * r),
                                                                                          int(img_scale[1] * r))
        f = min(long_edge / max(h0, w0), short_edge / min(h0, w0))
        scaled = _torch_resize(img, (int(h0 * f + 0.5), int(w0 * f + 0.5)))
        for flipped in [False, True] if flip else [False]:
            x = np.ascontiguousarray(scaled[:, :, ::-1]) if flipped else scaled
            logits = torch.from_numpy(np.transpose(reference_slide(model, x, crop, stride), (0, 3, 1, 2)))
            logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
            probs = F.softmax(logits, dim=1)
            probs = probs.flip(dims=(3,)) if flipped else probs
            total = probs if total is None else total + probs
            n += 1
    return np.transpose((total / n).numpy(), (0, 2, 3, 1))


def smooth_model(xp):
    """A model that is not flip-equivariant (x coordinate term) and works on real-valued images."""
    weights = np.random.default_rng(7).normal(size=(3, C)).astype(np.float32)

    def model(crops):
        x = xp.arange(crops.shape[2], dtype=xp.float32)[None, None, :, None]
        return crops @ xp.asarray(weights) + 0.1 * x * xp.arange(C, dtype=xp.float32)
    return model


# slide mode compiles slowly (windows x passes), so it runs two of the ratios; whole mode runs all five
@pytest.mark.parametrize("mode,ratios", [("slide", (1.0, 1.375)), ("whole", inference.AUG_TEST_RATIOS)])
def test_multi_scale_flip_matches_mmseg_aug_test(mode, ratios):
    original_hw, img_scale = (13, 17), (40, 10)
    img = np.random.default_rng(8).normal(size=(2, *original_hw, 3)).astype(np.float32)
    kwargs = dict(mode=mode, scales=ratios, flip=True, img_scale=img_scale, crop=8, stride=5, small_crop="direct")
    run = jax.jit(functools.partial(inference.segment_probs, smooth_model(jnp), original_size=original_hw,
                                    num_classes=C, **kwargs))
    got = np.asarray(run(jnp.asarray(img)))
    # whole mode is slide inference with a crop larger than any scaled image
    crop = (8, 8) if mode == "slide" else (100, 100)
    want = reference_aug_test(smooth_model(np), img, original_hw, ratios, True, img_scale, crop, (5, 5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    pred = np.asarray(inference.segment(smooth_model(jnp), jnp.asarray(img), original_hw, C, **kwargs))
    assert pred.shape == (2, *original_hw) and pred.dtype == np.int32
    top2 = np.sort(want, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(pred[clear], want.argmax(-1)[clear])
    # each ratio and the flip change the answer, so a pass left out or run at the wrong size would be seen
    one_pass = reference_aug_test(smooth_model(np), img, original_hw, (1.0,), False, img_scale, crop, (5, 5))
    no_flip = reference_aug_test(smooth_model(np), img, original_hw, ratios, False, img_scale, crop, (5, 5))
    assert np.abs(one_pass - want).max() > 1e-3 and np.abs(no_flip - want).max() > 1e-3


def test_single_scale_segment_is_argmax_of_the_resized_logits():
    original_hw = (21, 30)
    img = integer_image((1, *original_hw, 3), seed=9)
    scaled_hw = inference.keep_ratio_size(original_hw, (40, 10))
    assert scaled_hw == (10, 14)
    scaled = inference.resize_image(jnp.asarray(img), scaled_hw)
    # the image passed at the scale's size is used as is (the tf pipeline's exact cv2 resize stays untouched)
    pred = inference.segment(fake_seg_model(jnp), scaled, original_hw, C, img_scale=(40, 10), crop=8, stride=5)
    logits = inference.slide_inference(fake_seg_model(jnp), scaled, C, 8, 5)
    want = np.asarray(logits)
    want = _torch_resize(want, original_hw).argmax(-1)
    np.testing.assert_array_equal(np.asarray(pred), want)
    with pytest.raises(ValueError, match="mode"):
        inference.segment(fake_seg_model(jnp), scaled, original_hw, C, mode="tile")


def test_resize_image_does_not_antialias():
    # downscaling by 4 with half-pixel bilinear reads only 2 of every 4 source columns; an antialiased resize
    # (jax.image.resize's default) averages all 4
    img = np.zeros((1, 1, 16, 3), np.float32)
    img[:, :, 0::4] = 1.0
    got = np.asarray(inference.resize_image(jnp.asarray(img), (1, 4)))
    np.testing.assert_allclose(got, _torch_resize(img, (1, 4)), atol=1e-7)
    assert not np.allclose(got, np.asarray(jax.image.resize(img, (1, 1, 4, 3), "bilinear")))


# ------------------------------------------------------------------------------ padded evaluation batches

def padded_batch(sizes, shape, seed=15, junk=99.0):
    """Integer images of the given valid sizes, padded bottom/right with junk a correct function never reads."""
    rng = np.random.default_rng(seed)
    img = np.full((len(sizes), *shape, 3), junk, np.float32)
    for b, (h, w) in enumerate(sizes):
        img[b, :h, :w] = rng.integers(0, 10, size=(h, w, 3))
    return img, np.array(sizes, np.int32)


def test_slide_inference_padded_equals_slide_inference_per_image():
    traced = []

    def model(crops):
        traced.append(crops.shape)
        return fake_seg_model(jnp)(crops)

    run = jax.jit(functools.partial(inference.slide_inference_padded, model, num_classes=C, crop=8, stride=5,
                                    pad_value=-2.0))
    # (16, 24) padded: 3 x 5 windows; sizes with fewer windows, smaller than the crop, and the full size
    for sizes in ([(13, 19), (6, 24), (16, 5)], [(16, 24), (9, 9), (3, 17)]):
        img, hw = padded_batch(sizes, (16, 24))
        got = np.asarray(run(jnp.asarray(img), jnp.asarray(hw)))
        for b, (h, w) in enumerate(sizes):
            want = inference.slide_inference(fake_seg_model(jnp), jnp.asarray(img[b:b + 1, :h, :w]), C, 8, 5,
                                             pad_value=-2.0)
            np.testing.assert_array_equal(got[b, :h, :w], np.asarray(want)[0], err_msg=str((h, w)))
            assert not got[b, h:].any() and not got[b, :, w:].any()
    assert traced == [(45, 8, 8, 3)] and run._cache_size() == 1  # one program for every valid size
    with pytest.raises(ValueError, match=r"image_hw must be an integer array of shape \(3, 2\)"):
        run(jnp.asarray(img), jnp.asarray(hw[:2]))


RESIZES = [((13, 19), (26, 37)), ((16, 24), (7, 5)), ((9, 9), (9, 9)), ((1, 7), (3, 1)), ((16, 5), (16, 11))]


def test_resize_padded_equals_the_static_resize():
    rng = np.random.default_rng(16)
    x = np.full((len(RESIZES), 16, 24, 3), 1e6, np.float32)  # padding that must not leak in
    for b, ((h, w), _) in enumerate(RESIZES):
        x[b, :h, :w] = rng.normal(size=(h, w, 3))
    in_hw = np.array([r[0] for r in RESIZES], np.int32)
    out_hw = np.array([r[1] for r in RESIZES], np.int32)
    got = np.asarray(jax.jit(inference.resize_padded, static_argnums=3)(x, in_hw, out_hw, (26, 40)))
    assert got.shape == (len(RESIZES), 26, 40, 3)
    for b, ((h, w), (oh, ow)) in enumerate(RESIZES):
        # the same taps up to float32 rounding (XLA contracts multiply-adds into FMAs on the device)
        want = inference.resize_image(jnp.asarray(x[b:b + 1, :h, :w]), (oh, ow))
        np.testing.assert_allclose(got[b, :oh, :ow], np.asarray(want)[0], atol=4e-6, err_msg=str(RESIZES[b]))
        np.testing.assert_allclose(got[b, :oh, :ow], _torch_resize(x[b:b + 1, :h, :w], (oh, ow))[0], atol=2e-6)
        assert not got[b, oh:].any() and not got[b, :, ow:].any()


def test_segment_padded_equals_segment_per_image():
    sizes, label_sizes = [(13, 19), (6, 24), (16, 5)], [(26, 38), (12, 47), (31, 10)]
    img, hw = padded_batch(sizes, (16, 24), seed=17)
    label_hw = np.array(label_sizes, np.int32)
    run = jax.jit(functools.partial(inference.segment_padded, smooth_model(jnp), label_shape=(32, 48),
                                    num_classes=C, crop=8, stride=5))
    got = np.asarray(run(jnp.asarray(img), jnp.asarray(hw), jnp.asarray(label_hw)))
    assert got.shape == (3, 32, 48) and got.dtype == np.int32
    for b, ((h, w), (lh, lw)) in enumerate(zip(sizes, label_sizes)):
        # the image given at its scale's size is used as is; the scale only has to map (lh, lw) to (h, w)
        scale = (max(h, w), min(h, w))
        assert inference.scale_sizes((lh, lw), (1.0,), scale) == [(h, w)]
        probs = np.asarray(inference.segment_probs(smooth_model(jnp), jnp.asarray(img[b:b + 1, :h, :w]), (lh, lw),
                                                   C, crop=8, stride=5, img_scale=scale))[0]
        top2 = np.sort(probs, -1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4  # the resizes may differ in the last bits
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(got[b, :lh, :lw][clear], probs.argmax(-1)[clear])
        assert not got[b, lh:].any() and not got[b, :, lw:].any()


def test_keep_ratio_size_padded_equals_keep_ratio_size():
    sizes = [(h, w) for h in (1, 7, 13, 480, 512, 683, 1000, 2047) for w in (1, 5, 17, 640, 683, 1024, 4001)]
    scales = [(int(2048 * r), int(512 * r)) for r in inference.AUG_TEST_RATIOS] + [(40, 10), (7, 9)]
    hw = jnp.asarray(sizes, jnp.int32)
    for scale in scales:
        got = np.asarray(inference.keep_ratio_size_padded(hw, scale))
        np.testing.assert_array_equal(got, [inference.keep_ratio_size(size, scale) for size in sizes], str(scale))


def test_flip_valid_mirrors_each_valid_width():
    x = np.arange(2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6, 1)
    got = np.asarray(inference.flip_valid(jnp.asarray(x), jnp.asarray([[3, 4], [3, 6]], jnp.int32)))
    np.testing.assert_array_equal(got[0, :, :4], x[0, :, 3::-1])
    np.testing.assert_array_equal(got[0, :, 4:], x[0, :, 4:])  # beyond the valid width: unchanged
    np.testing.assert_array_equal(got[1], x[1, :, ::-1])


@pytest.mark.parametrize("ratios,flip", [((1.0,), False), pytest.param((1.0, 1.375), True, marks=pytest.mark.slow)])
def test_segment_padded_probs_equals_segment_probs_per_image(ratios, flip):
    """The multi-scale + flip test of padded batches, against `segment_probs` (itself checked against mmseg's
    aug_test above) on each example's unpadded ratio-1.0 image."""
    img_scale, label_sizes = (40, 10), [(13, 17), (21, 9), (10, 30)]
    sizes = [inference.keep_ratio_size(size, img_scale) for size in label_sizes]
    rng = np.random.default_rng(18)
    img = np.full((len(sizes), 24, 32, 3), 99.0, np.float32)  # padding a correct function never reads
    for b, (h, w) in enumerate(sizes):
        img[b, :h, :w] = rng.normal(size=(h, w, 3))
    kwargs = dict(scales=ratios, flip=flip, img_scale=img_scale, crop=8, stride=5)
    run = jax.jit(functools.partial(inference.segment_padded_probs, smooth_model(jnp), label_shape=(24, 32),
                                    num_classes=C, **kwargs))
    got = np.asarray(run(jnp.asarray(img), jnp.asarray(sizes, jnp.int32), jnp.asarray(label_sizes, jnp.int32)))
    assert got.shape == (3, 24, 32, C)
    for b, ((h, w), (lh, lw)) in enumerate(zip(sizes, label_sizes)):
        want = inference.segment_probs(smooth_model(jnp), jnp.asarray(img[b:b + 1, :h, :w]), (lh, lw), C, **kwargs)
        # the same taps up to float32 rounding (the padded resizes contract multiply-adds on the device)
        np.testing.assert_allclose(got[b, :lh, :lw], np.asarray(want)[0], atol=2e-5, err_msg=str((h, w)))


# ------------------------------------------------------------------------------------------------- depth

def reference_depth_test(model, img, class_ids, shift_size, flip, min_depth=1e-3, max_depth=10.0):
    """VPD depth/test.py (docs/reference.md, "Depth test protocol"), per image (the reference asserts batch 1), numpy,
    trailing depth channel."""
    outs = []
    for b in range(img.shape[0]):
        x, cid = img[b:b + 1], class_ids[b:b + 1]
        _, h, w, _ = x.shape
        interval = (w - h) // (shift_size - 1)
        masks = np.zeros((1, h, w, 1), np.float32)
        windows, ids = [], []
        for i in range(shift_size):
            windows.append(x[:, :, i * interval:i * interval + h])
            masks[:, :, i * interval:i * interval + h] += 1
            ids.append(cid)
        x, ids = np.concatenate(windows), np.concatenate(ids)
        if flip:
            x, ids = np.concatenate([x, x[:, :, ::-1]]), np.concatenate([ids, ids])
        pred = model(x, ids)
        if flip:
            half = pred.shape[0] // 2
            pred = (pred[:half] + pred[half:, :, ::-1]) / 2.0
        pred_s = np.zeros((1, h, w, 1), np.float32)
        for i in range(shift_size):
            pred_s[:, :, i * interval:i * interval + h] += pred[i:i + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            pred = pred_s / masks
        pred[np.isinf(pred)] = max_depth
        pred[np.isnan(pred)] = min_depth
        outs.append(pred)
    return np.concatenate(outs)


def fake_depth_model(xp, equivariant=False):
    """Depth (N, h, w, 1) from pixel values, the class id and (unless flip-equivariant) the window-local x."""
    def model(images, class_ids):
        depth = images[..., :1] * 0.25 + images[..., 1:2] + class_ids[:, None, None, None].astype(xp.float32)
        if not equivariant:
            depth = depth + 0.5 * xp.arange(images.shape[2], dtype=xp.float32)[None, None, :, None]
        return depth.astype(xp.float32)
    return model


@pytest.mark.parametrize("shift_size,flip", [(2, True), (2, False), (3, True), (4, False)])
def test_depth_shift_window_flip_equals_the_reference(shift_size, flip):
    img = integer_image((2, 6, 10, 3), seed=10)
    ids = np.array([3, 11], np.int32)
    got = inference.depth_shift_window_flip(fake_depth_model(jnp), jnp.asarray(img), jnp.asarray(ids),
                                            shift_size=shift_size, flip=flip)
    np.testing.assert_array_equal(np.asarray(got), reference_depth_test(fake_depth_model(np), img, ids,
                                                                        shift_size, flip))


def test_depth_windows_batch_order_and_overlap_at_the_reference_size():
    assert inference.depth_window_offsets(640, 480, 2) == [0, 160]
    seen = {}

    def model(images, class_ids):
        seen["images"], seen["ids"] = images, class_ids
        return jnp.ones(images.shape[:3], jnp.float32) * jnp.arange(images.shape[2])[::-1]

    img = jnp.asarray(np.random.default_rng(11).normal(size=(1, 48, 64, 3)).astype(np.float32))
    out = inference.depth_shift_window_flip(model, img, jnp.array([5]), window=48)
    w0, w1 = img[:, :, 0:48], img[:, :, 16:64]
    np.testing.assert_array_equal(np.asarray(seen["images"]),
                                  np.concatenate([w0, w1, w0[:, :, ::-1], w1[:, :, ::-1]]))
    np.testing.assert_array_equal(np.asarray(seen["ids"]), [5, 5, 5, 5])
    # the model returns 47 - x in each window; the flip average makes it 23.5 everywhere, so the overlap
    # division leaves 23.5 (a missing or doubled division would not)
    assert out.shape == (1, 48, 64)
    np.testing.assert_array_equal(np.asarray(out), np.full((1, 48, 64), 23.5, np.float32))
    no_flip = inference.depth_shift_window_flip(model, img, jnp.array([5]), flip=False)
    want = np.concatenate([np.arange(47, 31, -1), (np.arange(31, -1, -1) + np.arange(47, 15, -1)) / 2,
                           np.arange(15, -1, -1)])
    np.testing.assert_array_equal(np.asarray(no_flip)[0, 0], want.astype(np.float32))


def test_flip_equivariant_model_gives_the_same_depth_with_and_without_flip():
    img = jnp.asarray(np.random.default_rng(12).normal(size=(2, 6, 10, 3)).astype(np.float32))
    ids = jnp.array([0, 4])
    model = fake_depth_model(jnp, equivariant=True)
    with_flip = inference.depth_shift_window_flip(model, img, ids, flip=True)
    without = inference.depth_shift_window_flip(model, img, ids, flip=False)
    np.testing.assert_array_equal(np.asarray(with_flip), np.asarray(without))
    np.testing.assert_array_equal(np.asarray(without), np.asarray(model(img, ids)))  # pixelwise: windows agree


def test_depth_clean_up_and_uncovered_columns():
    img = integer_image((1, 4, 11, 3), seed=13)
    img[0, 0, 5, 0] = np.inf  # in two windows and their flips: +inf -> max_depth
    img[0, 1, 2, 0] = np.nan  # -> min_depth
    img[0, 2, 9, 0] = -np.inf  # -inf -> max_depth as well (torch.isinf)
    ids = np.array([2], np.int32)
    # shift_size 4: interval (11 - 4) // 3 = 2, windows end at 10: column 10 is uncovered -> 0/0 -> min_depth
    assert inference.depth_window_offsets(11, 4, 4) == [0, 2, 4, 6]
    got = np.asarray(inference.depth_shift_window_flip(fake_depth_model(jnp), jnp.asarray(img), jnp.asarray(ids),
                                                       shift_size=4, min_depth=0.5, max_depth=7.0))
    want = reference_depth_test(fake_depth_model(np), img, ids, 4, True, min_depth=0.5, max_depth=7.0)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 5, 0] == 7.0 and got[0, 1, 2, 0] == 0.5 and got[0, 2, 9, 0] == 7.0
    np.testing.assert_array_equal(got[0, :, 10, 0], 0.5)
    assert np.isfinite(got).all()


def test_depth_under_jit_and_chunks_and_errors():
    traced = []

    def model(images, class_ids):
        traced.append(images.shape)
        return fake_depth_model(jnp)(images, class_ids)[..., 0]

    img = integer_image((2, 6, 10, 3), seed=14)
    ids = np.array([1, 2], np.int32)
    run = jax.jit(functools.partial(inference.depth_shift_window_flip, model, chunk_size=3))
    got = run(jnp.asarray(img), jnp.asarray(ids))
    run(jnp.asarray(img) + 1, jnp.asarray(ids))
    assert run._cache_size() == 1 and traced == [(3, 6, 6, 3)]  # 8 windows in chunks of 3, traced once
    want = reference_depth_test(fake_depth_model(np), img, ids, 2, True)[..., 0]
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match=r"class_ids must have shape \(2,\)"):
        inference.depth_shift_window_flip(model, jnp.asarray(img), jnp.array([1]))
    with pytest.raises(ValueError, match="window width must be in"):
        inference.depth_shift_window_flip(model, jnp.asarray(img), jnp.asarray(ids), window=11)
    with pytest.raises(ValueError, match=r"\(8, 6, 6\).*\(8, 6, 3\)"):
        inference.depth_shift_window_flip(lambda x, c: x[:, :, :3, 0], jnp.asarray(img), jnp.asarray(ids))
