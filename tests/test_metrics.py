"""Metrics: hand-computed cases, straightforward numpy/torch re-implementations, jit + padding equivalence."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import torch

from vpd_jax import metrics

# ---------------------------------------------------------------------------------------------- segmentation


def test_segmentation_hand_made():
    # classes 0..3; class 3 never appears (nan), class 2 predicted once but absent from the labels (IoU 0, Acc nan),
    # and a class-2 prediction on an ignored pixel does not count
    preds = [np.array([[0, 0, 1], [1, 2, 0]]), np.array([[1, 2], [0, 2]])]
    labels = [np.array([[0, 1, 1], [1, 255, 255]]), np.array([[1, 0], [0, 255]])]
    s = metrics.segmentation_scores(preds, labels, num_classes=4)
    # class 0: I = 1 + 1, pred area 2 + 1, label area 1 + 2 -> U = 4
    # class 1: I = 2 + 1, pred area 2 + 1, label area 3 + 1 -> U = 4
    # class 2: I = 0, pred area 1, label area 0 -> U = 1
    np.testing.assert_allclose(s["IoU"], [2 / 4, 3 / 4, 0.0, np.nan])
    np.testing.assert_allclose(s["Acc"], [2 / 3, 3 / 4, np.nan, np.nan])
    assert s["mIoU"] == pytest.approx((2 / 4 + 3 / 4 + 0) / 3)
    assert s["mAcc"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert s["aAcc"] == pytest.approx(5 / 7)


def _reference_areas(preds, labels, num_classes):
    out = np.zeros((4, num_classes), np.int64)
    for p, l in zip(preds, labels):
        v = l != 255
        for c in range(num_classes):
            pc, lc = (p == c) & v, (l == c) & v
            out[:, c] += [(pc & lc).sum(), (pc | lc).sum(), pc.sum(), lc.sum()]
    return out


def test_segmentation_random_against_reference_and_all_ignored():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 6, size=(rng.integers(5, 20), rng.integers(5, 20))) for _ in range(7)]
    labels = [np.where(rng.random(p.shape) < 0.2, 255, rng.integers(0, 6, size=p.shape)) for p in preds]
    labels[3][:] = 255  # an image with every pixel ignored contributes nothing
    s = metrics.segmentation_scores(preds, labels, 6)
    i, u, _, lab = _reference_areas(preds, labels, 6)
    np.testing.assert_allclose(s["IoU"], i / u)
    assert s["mIoU"] == pytest.approx(np.mean(i / u)) and s["aAcc"] == pytest.approx(i.sum() / lab.sum())
    s_without = metrics.segmentation_scores(preds[:3] + preds[4:], labels[:3] + labels[4:], 6)
    assert s_without["mIoU"] == s["mIoU"]


def test_segmentation_jit_with_padding_equals_numpy():
    rng = np.random.default_rng(1)
    preds = rng.integers(0, 5, size=(4, 9, 11)).astype(np.int32)
    labels = np.where(rng.random(preds.shape) < 0.1, 255, rng.integers(0, 5, size=preds.shape)).astype(np.int32)
    areas = jax.jit(lambda p, l, m: metrics.segmentation_areas(p, l, 5, example_mask=m))(
        jnp.asarray(preds), jnp.asarray(labels), jnp.asarray([True, True, True, False]))
    metric = metrics.SegmentationMetric(5)
    metric.update(areas)
    np.testing.assert_array_equal(metric.areas, _reference_areas(preds[:3], labels[:3], 5))
    want = metrics.segmentation_scores(preds[:3], labels[:3], 5)
    assert metric.result()["mIoU"] == want["mIoU"]


# ---------------------------------------------------------------------------------------------- depth


def test_depth_hand_made():
    pred = np.array([[[1.0, 1.0], [5.0, 8.0]]])
    gt = np.array([[[1.0, 2.0], [0.0, 4.0]]])  # the 0 is invalid
    s = metrics.depth_scores(pred, gt, crop=None)
    ln2 = math.log(2)
    want = dict(d1=1 / 3, d2=1 / 3, d3=1 / 3, abs_rel=0.5, sq_rel=1.5, rmse=math.sqrt(17 / 3),
                rmse_log=math.sqrt(2 * ln2 ** 2 / 3), log10=2 * math.log10(2) / 3, silog=math.sqrt(2 * ln2 ** 2 / 3))
    for k, v in want.items():
        assert s[k] == pytest.approx(v, rel=1e-12), k


def _reference_depth(preds, gts):
    """GLPDepth's cropping_img + eval_depth, per image, then the mean over images."""
    rows = []
    for p, g in zip(preds, gts):
        p, g = p.astype(np.float64), g.astype(np.float64)
        p[np.isinf(p)] = 10.0
        p[np.isnan(p)] = 1e-3
        valid = (g > 1e-3) & (g < 10)
        eval_mask = np.zeros_like(valid)
        eval_mask[45:471, 41:601] = True
        p, g = p[valid & eval_mask], g[valid & eval_mask]
        thresh = np.maximum(g / p, p / g)
        dl = np.log(p) - np.log(g)
        rows.append([(thresh < 1.25).mean(), (thresh < 1.25 ** 2).mean(), (thresh < 1.25 ** 3).mean(),
                     np.mean(np.abs(p - g) / g), np.mean((p - g) ** 2 / g), np.sqrt(np.mean((p - g) ** 2)),
                     np.sqrt(np.mean(dl ** 2)), np.mean(np.abs(np.log10(p) - np.log10(g))),
                     np.sqrt(np.mean(dl ** 2) - 0.5 * np.mean(dl) ** 2)])
    return dict(zip(metrics.DEPTH_METRICS, np.mean(rows, axis=0)))


def _depth_case(seed=2, n=3):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 9.0, size=(n, 480, 640)).astype(np.float32)
    gt[rng.random(gt.shape) < 0.3] = 0
    gt[0, 100:200] = 12.0  # beyond max depth: invalid
    pred = (gt * rng.uniform(0.7, 1.4, size=gt.shape) + 0.5).astype(np.float32)
    pred[1, 50:60, 50:60] = np.inf
    pred[1, 60:70, 50:60] = np.nan
    return pred, gt


def test_depth_random_against_glpdepth_with_eigen_crop():
    pred, gt = _depth_case()
    s = metrics.depth_scores(pred, gt)
    for k, v in _reference_depth(pred, gt).items():
        assert s[k] == pytest.approx(v, rel=1e-9), k
    outside = gt.copy()
    outside[2, 45:471, 41:601] = 0  # only pixels outside the crop: the image is left out of the average
    s2 = metrics.depth_scores(pred, outside)
    ref2 = _reference_depth(pred[:2], gt[:2])
    assert s2["rmse"] == pytest.approx(ref2["rmse"], rel=1e-9)
    s3 = metrics.depth_scores(pred[..., None], gt)  # a trailing channel on either side is fine
    assert s3["rmse"] == s["rmse"]
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        metrics.depth_scores(pred[:, :48, :64], gt[:, :48, :64])


def test_depth_jit_with_padding_equals_numpy():
    pred, gt = _depth_case(seed=3, n=2)
    pred, gt = pred[..., None], gt[..., None]
    padded_pred = np.concatenate([pred, np.ones_like(pred[:1])])
    padded_gt = np.concatenate([gt, np.ones_like(gt[:1])])
    values, counted = jax.jit(lambda p, g, m: metrics.depth_image_metrics(p, g, example_mask=m))(
        jnp.asarray(padded_pred), jnp.asarray(padded_gt), jnp.asarray([True, True, False]))
    metric = metrics.DepthMetric()
    metric.update(values, counted)
    got, want = metric.result(), metrics.depth_scores(pred, gt)
    for k in metrics.DEPTH_METRICS:
        assert got[k] == pytest.approx(want[k], rel=2e-5), k


# ---------------------------------------------------------------------------------------------- referring


def test_referring_hand_made_precision_uses_greater_equal():
    gts = np.zeros((3, 4, 5), bool)
    preds = np.zeros((3, 4, 5), bool)
    gts[0, 0, :3], preds[0, 0, 1:4] = True, True  # I = 2, U = 4: IoU exactly 0.5
    # sentence 1: both empty -> IoU 0 (U = 0)
    gts[2, :2] = True  # 10 pixels
    preds[2, :2, :4] = True  # I = 8 ... make it 9/10
    preds[2, 1, 4] = True
    s = metrics.referring_scores(preds.astype(np.uint8), gts)
    assert s["oIoU"] == pytest.approx((2 + 0 + 9) / (4 + 0 + 10))
    assert s["mIoU"] == pytest.approx((0.5 + 0 + 0.9) / 3)
    assert s["P@0.5"] == pytest.approx(2 / 3) and s["P@0.9"] == pytest.approx(1 / 3)
    assert s["P@0.6"] == s["P@0.7"] == s["P@0.8"] == pytest.approx(1 / 3)


def test_referring_random_and_jit_padding():
    rng = np.random.default_rng(4)
    preds, gts = rng.random((6, 16, 16)) < 0.4, rng.random((6, 16, 16)) < 0.3
    i = (preds & gts).sum((1, 2))
    u = (preds | gts).sum((1, 2))
    s = metrics.referring_scores(preds, gts)
    assert s["oIoU"] == pytest.approx(i.sum() / u.sum()) and s["mIoU"] == pytest.approx(np.mean(i / u))
    counts, valid = jax.jit(lambda p, g, m: metrics.referring_counts(p, g, m))(
        jnp.asarray(np.concatenate([preds, preds[:2]])), jnp.asarray(np.concatenate([gts, ~gts[:2]])),
        jnp.asarray([True] * 6 + [False] * 2))
    metric = metrics.ReferringMetric()
    metric.update(counts, valid)
    assert metric.result() == s


# ---------------------------------------------------------------------------------------------- PhraseCut


class _ClipSegReference:
    """CLIPSeg's FixedIntervalMetrics.add/value, re-written from docs/reference.md, "PhraseCut metrics", with torch
    (sorted-prediction scan)."""

    def __init__(self):
        self.thresholds = np.linspace(0, 1, 51)[1:-1]
        self.rows = []

    def add(self, prob, gt):
        p = torch.from_numpy(prob.astype(np.float32)).flatten()
        g = torch.from_numpy(gt.astype(np.float32)).flatten()
        order = p.sort()
        p, g = order.values, g[order.indices]
        row = []
        for thr in self.thresholds:
            above = torch.where(p > thr)[0]
            n = int(above[0]) if len(above) else len(g)
            fn, tp = int(g[:n].sum()), int(g[n:].sum())
            row.append((tp, len(g) - n - tp, fn, n - fn))
        self.rows.append(row)

    def value(self):
        a = np.array(self.rows, np.float64)  # (samples, thresholds, 4)
        tp, fp, fn = a[..., 0].sum(0), a[..., 1].sum(0), a[..., 2].sum(0)
        made = tp + fp > 0
        pr = sorted(set(zip(tp[made] / (1 + tp[made] + fn[made]), tp[made] / (1 + tp[made] + fp[made]))))
        ap = scipy.integrate.simpson([q for _, q in pr], x=[r for r, _ in pr])
        miou = (a[..., 0] / (1 + a[..., 0] + a[..., 1] + a[..., 2])).mean(0)
        i3, i5 = list(self.thresholds).index(0.3), list(self.thresholds).index(0.5)
        fg = tp / (1 + tp + fp + fn)
        return {"mIoU@0.3": miou[i3], "IoU_FG@0.3": fg[i3], "IoU_FG@0.5": fg[i5], "AP": ap}


def test_phrasecut_hand_made():
    probs = np.array([[[0.9, 0.1], [0.1, 0.1]], [[0.4, 0.6], [0.2, 0.35]]], np.float32)
    gts = np.array([[[1, 0], [0, 0]], [[0, 1], [1, 0]]])
    s = metrics.phrasecut_scores(probs, gts)
    # at 0.3: sample 0 tp=1 -> 1/2; sample 1 predicts {0.4, 0.6, 0.35}: tp=1, fp=2, fn=1 -> 1/5
    assert s["mIoU@0.3"] == pytest.approx((1 / 2 + 1 / 5) / 2)
    assert s["IoU_FG@0.3"] == pytest.approx(2 / (1 + 2 + 2 + 1))
    # at 0.5: sample 1 predicts only 0.6 (tp): totals tp=2, fp=0, fn=1
    assert s["IoU_FG@0.5"] == pytest.approx(2 / (1 + 2 + 0 + 1))


def test_phrasecut_random_against_clipseg_and_jit_padding():
    rng = np.random.default_rng(5)
    gts = rng.random((5, 12, 12)) < 0.3
    probs = np.clip(gts * 0.4 + rng.random((5, 12, 12)) * 0.7, 0, 1).astype(np.float32)
    probs[0, :3, :3] = np.float32(0.3)  # exactly on a threshold: "p > t" in float32
    probs[1, :2, :2] = np.float32(0.02)
    ref = _ClipSegReference()
    for p, g in zip(probs, gts):
        ref.add(p, g)
    want, got = ref.value(), metrics.phrasecut_scores(probs, gts)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    counts, valid = jax.jit(lambda p, g, m: metrics.phrasecut_counts(p, g, m))(
        jnp.asarray(np.concatenate([probs, probs[:1]])), jnp.asarray(np.concatenate([gts, gts[:1]])),
        jnp.asarray([True] * 5 + [False]))
    metric = metrics.PhraseCutMetric()
    metric.update(counts, valid)
    assert metric.result() == got
    assert np.all(np.asarray(counts).sum(-1) == 144)
