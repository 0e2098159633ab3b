"""Intensity normalisation of the network's input, the same at train, evaluate and predict time.

Three methods (`data.normalize`):

* `scale`: x / 255, the Keras notebook's.
* `zscore_volume`: per patient and channel, (x - mean) / std over the whole volume (Buda et al.
  2019). A constant non-zero background (seen: 76 and 103 in the pre-contrast channel of two
  FG scans) shifts those statistics and the model then fails on that scan.
* `brain_zscore`: per patient and channel, statistics over the brain only, with percentile
  clipping, as nnU-Net does for MRI. Robust to the background's value and to the scan's overall
  brightness (dark scans), which vary between scanners.

`brain_zscore` in detail, for one patient volume (all its slices):

1. background b_c: the median of the 4-pixel frame of every slice, per channel c;
2. foreground (brain): pixels where max_c |x_c - b_c| > t, with
   t = max(0.1 * the 99th percentile of max_c |x_c - b_c| over the volume, 1);
3. over the foreground, per channel: the 0.5th and 99.5th percentiles (low, high), then the
   mean and std of the values clipped to [low, high];
4. every pixel: z = (clip(x, low, high) - mean) / std, and background pixels set to the
   value of `low`, (low - mean) / std: the darkest brain value, whatever the scanner wrote there.

Steps 1-3 run once per volume in NumPy (`brain_statistics`; the prepared data stores them per
slice as `brain_stats`), step 4 per batch on the device (`normalize_images`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("scale", "zscore_volume", "brain_zscore")

# Rows of a `brain_stats` array (6, 3): one value per channel (the threshold is repeated).
BACKGROUND, THRESHOLD, LOW, HIGH, MEAN, STD = range(6)
BORDER = 4  # pixels of each slice's frame that estimate the background
PERCENTILES = (0.5, 99.5)
RELATIVE_THRESHOLD = 0.1
MIN_FOREGROUND = 64  # fewer brain pixels than this: statistics over the whole volume instead


def _as_volume(images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    slices = list(images)
    if not slices:
        raise ValueError("brain statistics need at least one slice")
    for s in slices:
        if s.ndim != 3 or s.shape[-1] != 3:
            raise ValueError(f"slices must be (H, W, 3), not {s.shape}")
    return [np.asarray(s, np.float32) for s in slices]


def brain_statistics(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """The (6, 3) float32 `brain_stats` of one patient's slices (each (H, W, 3), any size):
    rows background, threshold, low, high, mean, std (see the module docstring)."""
    slices = _as_volume(images)
    frame = []
    for s in slices:
        b = min(BORDER, s.shape[0] // 2, s.shape[1] // 2) or 1
        frame += [s[:b].reshape(-1, 3), s[-b:].reshape(-1, 3)]
        frame += [s[:, :b].reshape(-1, 3), s[:, -b:].reshape(-1, 3)]
    background = np.median(np.concatenate(frame), axis=0)
    pixels = np.concatenate([s.reshape(-1, 3) for s in slices])
    distance = np.abs(pixels - background).max(axis=1)
    threshold = max(RELATIVE_THRESHOLD * float(np.percentile(distance, 99)), 1.0)
    brain = pixels[distance > threshold]
    if len(brain) < MIN_FOREGROUND:  # a blank or nearly blank volume: nothing to single out
        brain = pixels
    low, high = np.percentile(brain, PERCENTILES, axis=0)
    clipped = np.clip(brain, low, high)
    mean = clipped.mean(axis=0)
    std = np.maximum(clipped.std(axis=0), 1.0)  # a flat channel: no division by ~0
    return np.stack([background, np.full(3, threshold), low, high, mean, std]).astype(np.float32)


def brain_mask(images: jax.Array, brain_stats: jax.Array) -> jax.Array:
    """(B, H, W, 1) bool: pixels that differ from the volume's background by more than its
    threshold in some channel. `images` (B, H, W, 3) on the 0..255 scale, stats (B, 6, 3)."""
    background = brain_stats[:, BACKGROUND][:, None, None, :]
    threshold = brain_stats[:, THRESHOLD, :1][:, None, None, :]
    distance = jnp.max(jnp.abs(images - background), axis=-1, keepdims=True)
    return distance > threshold


def normalize_images(
    images,
    normalize: str,
    volume_mean=None,
    volume_std=None,
    brain_stats=None,
) -> jax.Array:
    """uint8-range images (B, H, W, 3) -> the network's float32 input.

    `volume_mean`, `volume_std` (B, 3) serve `zscore_volume`; `brain_stats` (B, 6, 3) serves
    `brain_zscore` (each example carries its own patient's statistics).
    """
    images = jnp.asarray(images).astype(jnp.float32)
    if normalize == "scale":
        return images / 255.0
    if normalize == "zscore_volume":
        if volume_mean is None or volume_std is None:
            raise ValueError("zscore_volume needs volume_mean and volume_std")
        mean = jnp.asarray(volume_mean, jnp.float32)[:, None, None, :]
        std = jnp.maximum(jnp.asarray(volume_std, jnp.float32)[:, None, None, :], 1e-6)
        return (images - mean) / std
    if normalize == "brain_zscore":
        if brain_stats is None:
            raise ValueError("brain_zscore needs brain_stats (see brain_statistics)")
        stats = jnp.asarray(brain_stats, jnp.float32)
        row = lambda r: stats[:, r][:, None, None, :]  # noqa: E731
        clipped = jnp.clip(images, row(LOW), row(HIGH))
        clipped = jnp.where(brain_mask(images, stats), clipped, row(LOW))
        return (clipped - row(MEAN)) / row(STD)
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
