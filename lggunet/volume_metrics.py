"""Per-volume segmentation metrics in NumPy/SciPy: Dice, precision, recall, HD95, and
tumour-slice detection. Inputs are binary masks; a volume is one patient's slices in order.

HD95 is in pixels: distances between mask surfaces on the voxel grid with unit spacing (an
in-plane pixel, and one slice step; the data set does not record slice thickness). It is
undefined (NaN) when either mask is empty; means skip those volumes and say how many counted.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _masks(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as bool arrays of one shape (NumPy would broadcast others into a wrong answer)."""
    t, p = np.asarray(true, bool), np.asarray(pred, bool)
    if t.shape != p.shape:
        raise ValueError(f"true and predicted masks differ in shape: {t.shape} and {p.shape}")
    return t, p


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """2|T&P| / (|T| + |P|); 1.0 when both are empty."""
    t, p = _masks(true, pred)
    total = t.sum() + p.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(t, p).sum() / total)


def precision_recall(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(TP / predicted, TP / true); NaN where the denominator is 0."""
    t, p = _masks(true, pred)
    tp = np.logical_and(t, p).sum()
    precision = float(tp / p.sum()) if p.any() else float("nan")
    recall = float(tp / t.sum()) if t.any() else float("nan")
    return precision, recall


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_around(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the box around their voxels: erosion treats the outside as empty, as
    the volume is there, so surfaces and the distances between them are the whole volume's
    (a tumour fills a few percent of it: the distance transforms take that much less time)."""
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(a | b))
    return a[box], b[box]


def hd95(true: np.ndarray, pred: np.ndarray, spacing=None) -> float:
    """95th-percentile Hausdorff distance between the masks' surfaces: the larger of the two
    directed 95th percentiles (MONAI's `compute_hausdorff_distance(percentile=95)`; medpy's
    `hd95` pools both directions and can come out lower). In voxels, or in the units of
    `spacing` (one length per axis, e.g. (slice thickness, pixel, pixel) in mm). NaN if
    either is empty."""
    t, p = _masks(true, pred)
    if not t.any() or not p.any():
        return float("nan")
    t, p = _crop_around(t, p)
    st, sp = _surface(t), _surface(p)
    # distance of every voxel to T's (P's) surface
    to_true = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(to_true[sp], 95), np.percentile(to_pred[st], 95)))


def detection(true_areas, pred_areas, min_pixels: int) -> dict[str, float]:
    """Tumour-slice detection: a slice is truly positive when its true mask is non-empty and
    predicted positive when its predicted mask has >= `min_pixels` pixels."""
    truth = np.asarray(true_areas) > 0
    called = np.asarray(pred_areas) >= min_pixels
    tp, fn = int((truth & called).sum()), int((truth & ~called).sum())
    tn, fp = int((~truth & ~called).sum()), int((~truth & called).sum())
    return {
        "min_pixels": int(min_pixels),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def summary(values) -> dict[str, float]:
    """mean / median / std over the finite values, and how many there were."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "count": 0}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std()),
        "count": int(v.size),
    }
