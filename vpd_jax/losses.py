"""Training losses of the three VPD tasks, computed in float32 (NHWC logits).

* `segmentation_loss`: mmseg CrossEntropyLoss (docs/reference.md, "Segmentation model and loss"). Logits are first
  upsampled bilinearly (align_corners=False) to the label size; ignored pixels (255) contribute 0, and the sum is
  divided by **all** pixels of the batch (`avg_non_ignore=False`, mmseg 0.30's default) or by the valid ones
  (`avg_non_ignore=True`).
* `silog_loss`: sqrt(mean(d^2) - lambda * mean(d)^2), d = log(gt) - log(pred), pooled over every valid pixel
  (gt > 0) of the batch; the reference's lambda is 0.5 (docs/reference.md, "Depth loss").
* `referring_loss`: cross entropy with class weights [0.9, 1.1]: sum_i w_{y_i} nll_i / sum_i w_{y_i}
  (docs/reference.md, "Referring loss and optimiser").

Labels outside [0, num_classes) other than the ignore index make the loss NaN (PyTorch raises instead), which
the trainer's NaN check reports.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vpd_jax.models import resize


def _nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-pixel -log softmax(logits)[label] in float32; NaN where the label is out of range."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1, mode="fill",
                                 fill_value=jnp.nan)
    return -picked[..., 0]


def _check_spatial(logits: jax.Array, labels: jax.Array, what: str) -> None:
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{what}: expected logits (B, h, w, C) and labels (B, H, W), got {logits.shape} and "
                         f"{labels.shape}")


def segmentation_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
                      avg_non_ignore: bool = False) -> jax.Array:
    """Mean cross entropy of (B, h, w, C) logits against (B, H, W) integer labels (see the module docstring)."""
    _check_spatial(logits, labels, "segmentation_loss")
    if logits.shape[1:3] != labels.shape[1:3]:
        logits = resize.bilinear(logits.astype(jnp.float32), labels.shape[1:3], align_corners=False)
    valid = labels != ignore_index
    nll = _nll(logits, jnp.where(valid, labels, 0))
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    denominator = jnp.sum(valid) if avg_non_ignore else labels.size
    return total / jnp.maximum(denominator, 1)


def _drop_channel(x: jax.Array) -> jax.Array:
    return x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x


def silog_loss(pred: jax.Array, gt: jax.Array, variance_focus: float = 0.5) -> jax.Array:
    """Scale-invariant log loss over the valid (gt > 0) pixels of the whole batch; 0 when none is valid.

    `pred` and `gt` are depths in metres, (B, H, W) or (B, H, W, 1)."""
    pred, gt = _drop_channel(pred).astype(jnp.float32), _drop_channel(gt).astype(jnp.float32)
    if pred.shape != gt.shape:
        raise ValueError(f"silog_loss: prediction {pred.shape} and ground truth {gt.shape} differ")
    valid = gt > 0
    d = jnp.where(valid, jnp.log(jnp.where(valid, gt, 1.0)) - jnp.log(jnp.where(valid, pred, 1.0)), 0.0)
    n = jnp.maximum(jnp.sum(valid), 1)
    mean_d, mean_d2 = jnp.sum(d) / n, jnp.sum(d * d) / n
    return jnp.sqrt(jnp.maximum(mean_d2 - variance_focus * mean_d * mean_d, 0.0))


def referring_loss(logits: jax.Array, masks: jax.Array,
                   class_weights: Sequence[float] = (0.9, 1.1)) -> jax.Array:
    """Class-weighted cross entropy of (B, H, W, 2) logits against (B, H, W) {0, 1} masks at the same size."""
    _check_spatial(logits, masks, "referring_loss")
    if logits.shape[1:3] != masks.shape[1:3] or logits.shape[-1] != len(class_weights):
        raise ValueError(f"referring_loss: logits {logits.shape} must match masks {masks.shape} spatially and "
                         f"have {len(class_weights)} classes")
    masks = masks.astype(jnp.int32)
    weights = jnp.asarray(class_weights, jnp.float32)[masks]
    return jnp.sum(weights * _nll(logits, masks)) / jnp.sum(weights)
