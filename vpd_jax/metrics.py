"""Evaluation metrics of the references, as device-side counts plus host-side accumulators.

Each metric has three parts:
* a *count* function that works on `jax.numpy` arrays (jit-friendly, static shapes; run it inside the eval step
  so only small count arrays leave the device) and on numpy arrays (the same code);
* an accumulator (`update(*counts)`, `result()`), which sums counts on the host in int64/float64. Under `jax.jit`
  over a mesh the counts of a global batch are already global, so every host accumulates the same numbers;
* a numpy convenience function (`segmentation_scores`, `depth_scores`, `referring_scores`, `phrasecut_scores`).
Padded examples are excluded with `example_mask` (B,) (True = real example). All scores are fractions, not %.

* Segmentation (mmseg; docs/reference.md, "Segmentation test protocol"): per-class intersection/union/prediction/label
  areas summed over the whole set (pixels labelled `ignore_index` are skipped); IoU_c = I/U (nan when U = 0), Acc_c =
  I/label area; mIoU and mAcc are nan-means over classes, aAcc = sum I / sum label area.
* Depth (GLPDepth; docs/reference.md, "Depth test protocol"): predictions cleaned (inf -> max_depth, NaN -> min_depth),
  valid pixels min_depth < gt < max_depth inside the crop (Eigen: rows 45:471, cols 41:601 of 480x640); each image's
  metrics over its valid pixels, then averaged over images. An image without valid pixels is left out of the average
  (the reference would produce NaN).
* Referring (LAVT; docs/reference.md, "Referring metrics"): per sentence I = |pred & gt|, U = |pred | gt|, IoU = I/U (0
  when U = 0); oIoU = sum I / sum U, mIoU = mean IoU, P@t = fraction of sentences with IoU >= t.
* PhraseCut (CLIPSeg FixedIntervalMetrics; docs/reference.md, "PhraseCut metrics"): thresholds linspace(0, 1, 51)[1:-1],
  a pixel is predicted where prob > threshold (compared in float32, as torch does); IoU_FG(t) = sum tp / (1 + sum tp +
  sum fp + sum fn) over the set; mIoU(t) = mean over samples of tp / (1 + tp + fp + fn); AP = Simpson integral of
  precision tp/(1+tp+fp) over recall tp/(1+tp+fn), over thresholds with a positive prediction, after removing duplicate
  (recall, precision) pairs and sorting them (ties in recall ordered by precision).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

Array = Any  # np.ndarray or jax.Array

DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601) of a 480x640 NYUv2 image
REFERRING_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PHRASECUT_THRESHOLDS = np.linspace(0, 1, 51)[1:-1]


def _xp(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _example_mask(xp, example_mask, batch: int):
    if example_mask is None:
        return xp.ones((batch,), bool)
    if tuple(example_mask.shape) != (batch,):
        raise ValueError(f"example_mask must have shape ({batch},), got {tuple(example_mask.shape)}")
    return example_mask.astype(bool)


def _bincount(xp, values, mask, length: int):
    """Per-bin counts of `values` where `mask`; values outside [0, length) must be masked out."""
    values = xp.where(mask, values, 0).reshape(-1)
    if xp is np:
        return np.bincount(values, mask.reshape(-1).astype(np.int64), minlength=length)[:length].astype(np.int64)
    return jnp.bincount(values, mask.reshape(-1).astype(jnp.int32), length=length)


def _check_same_shape(name: str, a, b) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name}: predictions {tuple(a.shape)} and ground truth {tuple(b.shape)} differ in shape")


def _quiet_divide(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num, np.float64) / np.asarray(den, np.float64)


def _nanmean(x) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(x))


# ---------------------------------------------------------------------------------------------- segmentation


def segmentation_areas(preds: Array, labels: Array, num_classes: int, ignore_index: int = 255,
                       example_mask: Array | None = None) -> Array:
    """(4, num_classes) counts [intersection, union, prediction area, label area] of a batch of (B, H, W) maps.

    Like mmseg's histc, values outside [0, num_classes) count in no class; `ignore_index` label pixels and
    masked-out examples are skipped entirely."""
    _check_same_shape("segmentation_areas", preds, labels)
    xp = _xp(preds, labels)
    keep = (labels != ignore_index) & _example_mask(xp, example_mask, labels.shape[0]).reshape(
        (-1,) + (1,) * (labels.ndim - 1))
    pred_in = keep & (preds >= 0) & (preds < num_classes)
    label_in = keep & (labels >= 0) & (labels < num_classes)
    intersect = _bincount(xp, labels, label_in & (preds == labels), num_classes)
    area_pred = _bincount(xp, preds, pred_in, num_classes)
    area_label = _bincount(xp, labels, label_in, num_classes)
    return xp.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


class SegmentationMetric:
    """Sums `segmentation_areas` outputs over the whole set; `result()` gives mmseg's scores."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.areas = np.zeros((4, num_classes), np.int64)

    def update(self, areas: Array) -> None:
        areas = np.asarray(areas)
        if areas.shape != self.areas.shape:
            raise ValueError(f"expected areas of shape {self.areas.shape}, got {areas.shape}")
        self.areas += areas.astype(np.int64)

    def result(self) -> dict[str, Any]:
        intersect, union, _, label = self.areas
        iou, acc = _quiet_divide(intersect, union), _quiet_divide(intersect, label)
        return {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": float(_quiet_divide(intersect.sum(), label.sum())),
                "IoU": iou, "Acc": acc}


def segmentation_scores(preds: Array | Sequence[Array], labels: Array | Sequence[Array], num_classes: int,
                        ignore_index: int = 255) -> dict[str, Any]:
    """mmseg mIoU/mAcc/aAcc (+ per-class IoU/Acc) of (N, H, W) maps or of per-image (H, W) maps of any size."""
    metric = SegmentationMetric(num_classes)
    if len(preds) != len(labels):
        raise ValueError(f"segmentation_scores: {len(preds)} predictions but {len(labels)} label maps")
    for pred, label in zip(preds, labels):
        metric.update(segmentation_areas(np.asarray(pred)[None], np.asarray(label)[None], num_classes, ignore_index))
    return metric.result()


# ---------------------------------------------------------------------------------------------- depth


def _crop_mask(xp, shape: tuple[int, int], crop) -> Array:
    if crop is None:
        return xp.ones(shape, bool)
    if crop == "eigen":
        if shape != (480, 640):
            raise ValueError(f"the Eigen crop is defined on 480x640 depth maps, got {shape}; pass crop=None or "
                             f"(top, bottom, left, right)")
        crop = EIGEN_CROP
    if isinstance(crop, str) or len(crop) != 4:
        raise ValueError(f"crop must be 'eigen', None or (top, bottom, left, right), got {crop!r}")
    top, bottom, left, right = crop
    rows, cols = np.arange(shape[0]), np.arange(shape[1])
    mask = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    return xp.asarray(mask)


def depth_image_metrics(preds: Array, gts: Array, min_depth: float = 1e-3, max_depth: float = 10.0,
                        crop: str | Sequence[int] | None = "eigen",
                        example_mask: Array | None = None) -> tuple[Array, Array]:
    """Per-image depth metrics of (B, H, W[, 1]) predictions and ground truths (metres).

    Returns (values (B, 9) in DEPTH_METRICS order, counted (B,) bool: real examples with >= 1 valid pixel)."""
    xp = _xp(preds, gts)
    preds, gts = (x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x for x in (preds, gts))
    _check_same_shape("depth_image_metrics", preds, gts)
    if preds.ndim != 3:
        raise ValueError(f"depth_image_metrics expects (B, H, W) or (B, H, W, 1) maps, got {tuple(preds.shape)}")
    dtype = np.float64 if xp is np else jnp.float32
    pred, gt = preds.astype(dtype), gts.astype(dtype)
    pred = xp.where(xp.isinf(pred), max_depth, pred)
    pred = xp.where(xp.isnan(pred), min_depth, pred)
    valid = (gt > min_depth) & (gt < max_depth) & _crop_mask(xp, tuple(gt.shape[1:]), crop)[None]
    n = valid.sum(axis=(1, 2))
    safe_n = xp.maximum(n, 1)
    p, g = xp.where(valid, pred, 1.0), xp.where(valid, gt, 1.0)

    def mean(x):
        return xp.where(valid, x, 0.0).sum(axis=(1, 2)) / safe_n

    ratio = xp.maximum(g / p, p / g)
    diff, log_diff = p - g, xp.log(p) - xp.log(g)
    values = xp.stack([
        mean(ratio < 1.25), mean(ratio < 1.25 ** 2), mean(ratio < 1.25 ** 3),
        mean(xp.abs(diff) / g), mean(diff ** 2 / g), xp.sqrt(mean(diff ** 2)), xp.sqrt(mean(log_diff ** 2)),
        mean(xp.abs(xp.log10(p) - xp.log10(g))), xp.sqrt(mean(log_diff ** 2) - 0.5 * mean(log_diff) ** 2),
    ], axis=1)
    return values, (n > 0) & _example_mask(xp, example_mask, gt.shape[0])


class DepthMetric:
    """Averages `depth_image_metrics` over the counted images."""

    def __init__(self):
        self.sums = np.zeros(len(DEPTH_METRICS), np.float64)
        self.count = 0

    def update(self, values: Array, counted: Array) -> None:
        values, counted = np.asarray(values, np.float64), np.asarray(counted, bool)
        self.sums += values[counted].sum(axis=0)
        self.count += int(counted.sum())

    def result(self) -> dict[str, float]:
        means = self.sums / self.count if self.count else np.full(len(DEPTH_METRICS), np.nan)
        return dict(zip(DEPTH_METRICS, map(float, means)))


def depth_scores(preds: Array | Sequence[Array], gts: Array | Sequence[Array], min_depth: float = 1e-3,
                 max_depth: float = 10.0, crop: str | Sequence[int] | None = "eigen") -> dict[str, float]:
    """Per-image depth metrics averaged over images, for (N, H, W[, 1]) arrays or sequences of (H, W[, 1])."""
    if len(preds) != len(gts):
        raise ValueError(f"depth_scores: {len(preds)} predictions but {len(gts)} ground truths")
    metric = DepthMetric()
    for pred, gt in zip(preds, gts):
        metric.update(*depth_image_metrics(np.asarray(pred)[None], np.asarray(gt)[None], min_depth, max_depth, crop))
    return metric.result()


# ---------------------------------------------------------------------------------------------- referring


def referring_counts(pred_masks: Array, gt_masks: Array, example_mask: Array | None = None) -> tuple[Array, Array]:
    """Per-sentence (B, 2) [intersection, union] of binary (B, H, W) masks (nonzero = foreground), and valid (B,)."""
    _check_same_shape("referring_counts", pred_masks, gt_masks)
    xp = _xp(pred_masks, gt_masks)
    pred, gt = pred_masks != 0, gt_masks != 0
    axes = tuple(range(1, pred.ndim))
    counts = xp.stack([(pred & gt).sum(axis=axes), (pred | gt).sum(axis=axes)], axis=1)
    return counts, _example_mask(xp, example_mask, pred.shape[0])


class ReferringMetric:
    """Summable statistics of per-sentence IoUs (host float64, like the reference's numpy ints / floats)."""

    def __init__(self, thresholds: Sequence[float] = REFERRING_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.cum_i = self.cum_u = self.sentences = 0
        self.iou_sum = 0.0
        self.hits = np.zeros(len(self.thresholds), np.int64)

    def update(self, counts: Array, valid: Array) -> None:
        counts = np.asarray(counts, np.int64)[np.asarray(valid, bool)]
        i, u = counts[:, 0], counts[:, 1]
        iou = np.where(u > 0, i / np.maximum(u, 1), 0.0)
        self.cum_i += int(i.sum())
        self.cum_u += int(u.sum())
        self.sentences += len(iou)
        self.iou_sum += float(iou.sum())
        self.hits += (iou[:, None] >= np.asarray(self.thresholds)[None, :]).sum(axis=0)

    def result(self) -> dict[str, float]:
        out = {"oIoU": self.cum_i / self.cum_u if self.cum_u else float("nan"),
               "mIoU": self.iou_sum / self.sentences if self.sentences else float("nan")}
        for t, hits in zip(self.thresholds, self.hits):
            out[f"P@{t:g}"] = hits / self.sentences if self.sentences else float("nan")
        return out


def referring_scores(pred_masks: Array | Sequence[Array], gt_masks: Array | Sequence[Array]) -> dict[str, float]:
    """oIoU, mIoU and P@0.5..0.9 over sentences, for (N, H, W) binary masks or sequences of (H, W) masks."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"referring_scores: {len(pred_masks)} predictions but {len(gt_masks)} ground truths")
    metric = ReferringMetric()
    for pred, gt in zip(pred_masks, gt_masks):
        metric.update(*referring_counts(np.asarray(pred)[None], np.asarray(gt)[None]))
    return metric.result()


# ---------------------------------------------------------------------------------------------- PhraseCut


def phrasecut_counts(probs: Array, gt_masks: Array, example_mask: Array | None = None) -> tuple[Array, Array]:
    """Per-sample, per-threshold (B, 49, 4) [tp, fp, fn, tn] of foreground probabilities (B, H, W) against binary
    masks (> 0.5 = foreground), and valid (B,). O(H W) memory: each pixel is binned by how many thresholds its
    probability exceeds, and the counts are reverse cumulative sums of the per-bin histograms."""
    _check_same_shape("phrasecut_counts", probs, gt_masks)
    xp = _xp(probs, gt_masks)
    batch, n_thr = probs.shape[0], len(PHRASECUT_THRESHOLDS)
    probs = probs.reshape(batch, -1).astype(xp.float32)
    fg = gt_masks.reshape(batch, -1) > 0.5
    above = xp.searchsorted(xp.asarray(PHRASECUT_THRESHOLDS, xp.float32), probs, side="left")  # #{t : p > t}
    bins = above + (n_thr + 1) * xp.arange(batch)[:, None]
    everything = xp.ones(bins.shape, bool)
    fg_hist = _bincount(xp, bins, fg, batch * (n_thr + 1)).reshape(batch, n_thr + 1)
    all_hist = _bincount(xp, bins, everything, batch * (n_thr + 1)).reshape(batch, n_thr + 1)
    # predicted at threshold j <=> above > j: sum the bins j+1 .. n_thr
    tp = xp.cumsum(fg_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    predicted = xp.cumsum(all_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    n_fg = fg_hist.sum(axis=1, keepdims=True)
    n_px = probs.shape[1]
    fp, fn = predicted - tp, n_fg - tp
    counts = xp.stack([tp, fp, fn, n_px - predicted - fn], axis=-1)
    return counts, _example_mask(xp, example_mask, batch)


class PhraseCutMetric:
    """Sums over samples of the [tp, fp, fn, tn] counts and of the per-sample IoUs, per threshold."""

    def __init__(self):
        self.summed = np.zeros((len(PHRASECUT_THRESHOLDS), 4), np.int64)
        self.sample_iou_sum = np.zeros(len(PHRASECUT_THRESHOLDS), np.float64)
        self.samples = 0

    def update(self, counts: Array, valid: Array) -> None:
        counts = np.asarray(counts, np.int64)[np.asarray(valid, bool)]
        tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
        self.summed += counts.sum(axis=0)
        self.sample_iou_sum += (tp / (1 + tp + fp + fn)).sum(axis=0)
        self.samples += len(counts)

    def curves(self) -> dict[str, np.ndarray]:
        tp, fp, fn = (self.summed[:, k].astype(np.float64) for k in range(3))
        return {"thresholds": PHRASECUT_THRESHOLDS, "IoU_FG": tp / (1 + tp + fp + fn),
                "mIoU": self.sample_iou_sum / max(self.samples, 1), "precision": tp / (1 + tp + fp),
                "recall": tp / (1 + tp + fn), "has_prediction": tp + fp > 0}

    def average_precision(self) -> float:
        c = self.curves()
        pairs = sorted(set(zip(c["recall"][c["has_prediction"]], c["precision"][c["has_prediction"]])))
        if not pairs:
            return float("nan")  # no positive prediction at any threshold (the reference asserts)
        recall, precision = zip(*pairs)
        return float(scipy.integrate.simpson(np.asarray(precision), x=np.asarray(recall)))

    def result(self) -> dict[str, float]:
        c = self.curves()
        at = lambda t: int(np.argmin(np.abs(PHRASECUT_THRESHOLDS - t)))
        return {"mIoU@0.3": float(c["mIoU"][at(0.3)]), "IoU_FG@0.3": float(c["IoU_FG"][at(0.3)]),
                "IoU_FG@0.5": float(c["IoU_FG"][at(0.5)]), "AP": self.average_precision()}


def phrasecut_scores(probs: Array | Sequence[Array], gt_masks: Array | Sequence[Array]) -> dict[str, float]:
    """mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5 and AP for (N, H, W) probabilities (after sigmoid) and binary masks."""
    if len(probs) != len(gt_masks):
        raise ValueError(f"phrasecut_scores: {len(probs)} predictions but {len(gt_masks)} ground truths")
    metric = PhraseCutMetric()
    for prob, gt in zip(probs, gt_masks):
        metric.update(*phrasecut_counts(np.asarray(prob)[None], np.asarray(gt)[None]))
    return metric.result()
