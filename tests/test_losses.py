"""Losses against torch.nn.functional.cross_entropy / the GLPDepth SiLog formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpd_jax import losses


def _seg_case(seed=0, ignore_fraction=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 8, 6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 32, 24)).astype(np.int32)
    labels[rng.random(labels.shape) < ignore_fraction] = 255
    return logits, labels


def _torch_seg(logits, labels, reduction):
    up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=labels.shape[1:], mode="bilinear",
                       align_corners=False)
    return F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255, reduction=reduction)


def test_segmentation_loss_divides_by_all_pixels_by_default():
    logits, labels = _seg_case()
    got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
    want = _torch_seg(logits, labels, "none").sum() / labels.size  # mmseg avg_non_ignore=False
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(got) < float(_torch_seg(logits, labels, "mean"))  # the valid-pixel mean is larger


def test_segmentation_loss_valid_pixel_mean_switch():
    logits, labels = _seg_case(1)
    got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=True)
    np.testing.assert_allclose(float(got), float(_torch_seg(logits, labels, "mean")), rtol=1e-5)


def test_segmentation_loss_edge_cases():
    logits, labels = _seg_case(2)
    labels[:] = 255
    for avg in (False, True):
        assert float(losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=avg)) == 0.0
    same = np.random.default_rng(3).normal(size=(1, 4, 4, 3)).astype(np.float32)
    lab = np.array([[[0, 1, 2, 255]] * 4], np.int32)
    want = F.cross_entropy(torch.from_numpy(same).permute(0, 3, 1, 2), torch.from_numpy(lab).long(),
                           ignore_index=255, reduction="sum") / 16
    np.testing.assert_allclose(float(losses.segmentation_loss(jnp.asarray(same), jnp.asarray(lab))), float(want),
                               rtol=1e-5)
    lab[0, 0, 0] = 7  # out of range and not ignored: NaN, not a silent clamp
    assert np.isnan(float(losses.segmentation_loss(jnp.asarray(same), jnp.asarray(lab))))
    g = jax.grad(lambda x: losses.segmentation_loss(x, jnp.asarray(_seg_case()[1])))(jnp.asarray(_seg_case()[0]))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def _torch_silog(pred, gt, lambd=0.5):
    pred, gt = torch.from_numpy(pred), torch.from_numpy(gt)
    valid = gt > 0
    diff_log = torch.log(gt[valid]) - torch.log(pred[valid])
    return torch.sqrt(torch.pow(diff_log, 2).mean() - lambd * torch.pow(diff_log.mean(), 2))


def test_silog_matches_reference_pooled_over_batch():
    rng = np.random.default_rng(4)
    pred = rng.uniform(0.5, 9.5, size=(3, 12, 10, 1)).astype(np.float32)
    gt = rng.uniform(0.1, 10, size=(3, 12, 10)).astype(np.float32)
    gt[rng.random(gt.shape) < 0.4] = 0
    gt[2] = 0  # an image without valid pixels: pooled over the batch, it just contributes nothing
    got = losses.silog_loss(jnp.asarray(pred), jnp.asarray(gt))
    np.testing.assert_allclose(float(got), float(_torch_silog(pred[..., 0], gt)), rtol=1e-5)
    np.testing.assert_allclose(float(losses.silog_loss(jnp.asarray(pred), jnp.asarray(gt), 1.0)),
                               float(_torch_silog(pred[..., 0], gt, 1.0)), rtol=1e-5)
    # scale invariance at lambda = 1, and 0 without valid pixels
    np.testing.assert_allclose(float(losses.silog_loss(jnp.asarray(gt * 3 + (gt == 0)), jnp.asarray(gt), 1.0)), 0,
                               atol=1e-3)
    assert float(losses.silog_loss(jnp.asarray(pred), jnp.zeros_like(jnp.asarray(gt)))) == 0.0
    g = jax.grad(lambda p: losses.silog_loss(p, jnp.asarray(gt)))(jnp.asarray(pred))
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match=r"\(3, 12, 9\)"):
        losses.silog_loss(jnp.asarray(pred), jnp.asarray(gt[:, :, :9]))


def test_referring_loss_class_weighted_mean():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 16, 16, 2)).astype(np.float32) * 2
    masks = (rng.random((2, 16, 16)) < 0.2).astype(np.int32)
    got = losses.referring_loss(jnp.asarray(logits), jnp.asarray(masks))
    want = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(masks).long(),
                           weight=torch.tensor([0.9, 1.1]))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    unweighted = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(masks).long())
    assert abs(float(got) - float(unweighted)) > 1e-4
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        losses.referring_loss(jnp.asarray(logits), jnp.asarray(masks[:, :8, :8]))
