"""Segmentation metrics: the Keras notebook's batch formulas, and per-slice / per-volume Dice.

Two families, kept apart on purpose:

* notebook metrics (`dice_coef`, `iou_coef`, `pixel_accuracy`) work on soft probabilities over
  the whole flattened batch with smooth=100, exactly as the Keras notebook; empty slices make
  them look better than they are.
* literature metrics (`per_slice_dice`, `per_volume_dice`) threshold the prediction at 0.5 and
  score each slice or each patient's whole 3D mask (Buda et al. 2019 report the mean per-volume
  Dice).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SMOOTH = 100.0


def _weighted(y_true, y_pred, weights):
    """Flattened batch tensors with padding examples (weight 0) zeroed out."""
    if weights is not None:
        w = jnp.reshape(weights, (-1,) + (1,) * (y_true.ndim - 1)).astype(y_pred.dtype)
        y_true, y_pred = y_true * w, y_pred * w
    return y_true, y_pred


def dice_coef(y_true, y_pred, weights=None, smooth: float = SMOOTH) -> jax.Array:
    """Notebook Dice: (2*sum(t*p) + s) / (sum(t) + sum(p) + s) over the flattened batch."""
    t, p = _weighted(y_true.astype(jnp.float32), y_pred.astype(jnp.float32), weights)
    return (2 * jnp.sum(t * p) + smooth) / (jnp.sum(t) + jnp.sum(p) + smooth)


def iou_coef(y_true, y_pred, weights=None, smooth: float = SMOOTH) -> jax.Array:
    """Notebook IoU: (sum(t*p) + s) / (sum(t + p) - sum(t*p) + s) over the flattened batch."""
    t, p = _weighted(y_true.astype(jnp.float32), y_pred.astype(jnp.float32), weights)
    inter = jnp.sum(t * p)
    return (inter + smooth) / (jnp.sum(t + p) - inter + smooth)


def pixel_accuracy(y_true, y_pred, weights=None, threshold: float = 0.5) -> jax.Array:
    """Keras binary accuracy: the share of (valid) pixels where (p > threshold) == t."""
    correct = ((y_pred > threshold) == (y_true > 0.5)).astype(jnp.float32)
    per_example = jnp.mean(correct.reshape(correct.shape[0], -1), axis=1)
    if weights is None:
        return jnp.mean(per_example)
    w = weights.astype(jnp.float32)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


def slice_stats(y_true, y_pred, threshold: float = 0.5) -> dict[str, jax.Array]:
    """Per-example pixel counts of the thresholded prediction: `intersection`, `true_area`,
    `pred_area`, each (B,) int32. Enough to compute any per-slice or per-volume overlap."""
    t = (y_true > 0.5).reshape(y_true.shape[0], -1)
    p = (y_pred > threshold).reshape(y_pred.shape[0], -1)
    return {
        "intersection": jnp.sum(t & p, axis=1, dtype=jnp.int32),
        "true_area": jnp.sum(t, axis=1, dtype=jnp.int32),
        "pred_area": jnp.sum(p, axis=1, dtype=jnp.int32),
    }


def _dice_from_counts(intersection, true_area, pred_area) -> np.ndarray:
    inter = np.asarray(intersection, np.float64)
    total = np.asarray(true_area, np.float64) + np.asarray(pred_area, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 1.0, 2 * inter / total)


def per_slice_dice(intersection, true_area, pred_area) -> np.ndarray:
    """Dice of each slice's thresholded mask; a slice empty in both truth and prediction
    scores 1.0 (nothing to find, nothing found)."""
    return _dice_from_counts(intersection, true_area, pred_area)


def per_volume_dice(
    patient_ids: Sequence[str], intersection, true_area, pred_area
) -> dict[str, float]:
    """Patient id -> Dice of all that patient's slices taken as one 3D mask (the literature's
    metric, Buda et al. 2019). A volume empty in both truth and prediction scores 1.0."""
    ids, index = np.unique(np.asarray(patient_ids), return_inverse=True)
    sums = [
        np.bincount(index, weights=np.asarray(x, np.float64), minlength=len(ids))
        for x in (intersection, true_area, pred_area)
    ]
    return dict(zip(ids.tolist(), _dice_from_counts(*sums).tolist(), strict=True))
