"""Checks of what callers hand to the model (`lggunet.predict`, `Model.__call__`): images,
per-volume statistics and thresholds, each an InputError saying what was expected."""

from __future__ import annotations

import numbers

import numpy as np

from lggunet.errors import InputError


def check_statistics(name: str, value, shape: tuple, n: int) -> None:
    """A per-volume statistic of `shape` (or one per slice, (n, *shape)), finite; a std >= 0."""
    if value is None:
        return
    try:
        value = np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not numeric ({e})") from e
    if value.shape not in (shape, (n, *shape)):
        raise InputError(f"{name} of shape {value.shape}: expected {shape} or {(n, *shape)}")
    if not np.isfinite(value).all():
        raise InputError(f"{name} holds NaN or infinite values")
    if name == "brain_stats" and (value[..., 5, :] <= 0).any():
        raise InputError("brain_stats' std row (5) must be positive (see brain_statistics)")
    if name == "volume_std" and (value < 0).any():
        raise InputError("volume_std must not be negative (a channel's spread over the volume)")


def check_threshold(threshold: float) -> float:
    """A probability threshold strictly between 0 and 1 (InputError naming it otherwise)."""
    if isinstance(threshold, np.ndarray) and threshold.ndim == 0:
        threshold = threshold.item()
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0 < threshold < 1
    ):
        raise InputError(
            f"threshold={threshold!r} must be a probability strictly between 0 and 1 (p > "
            "threshold is tumour; 0.5 is the default)"
        )
    return float(threshold)


def check_images(images, scale: float | None = None) -> np.ndarray:
    """`images` as the model takes them, float32 (N, H, W, 3) or (H, W, 3) on the TIFFs' 0..255
    scale, or an InputError saying what was expected: integers in 0..255 (uint8 as read from
    the TIFFs), or floats with an explicit `scale` (255 for images in [0, 1], 1 for 0..255);
    finite; channels last (pre-contrast, FLAIR, post-contrast); at least one pixel."""
    if isinstance(scale, np.ndarray) and scale.ndim == 0:
        scale = scale.item()
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < np.inf
    ):
        raise InputError(f"scale={scale!r} must be a positive number (255 for images in [0, 1])")
    if isinstance(images, np.ma.MaskedArray):
        raise InputError(
            "images are a masked array: fill the masked pixels first (images.filled(0))"
        )
    try:
        images = np.asarray(images)
    except ValueError as e:  # a ragged list of slices
        raise InputError(f"images cannot be one array ({e}): give slices of one size") from e
    if images.dtype.kind not in "uif":
        raise InputError(f"images of dtype {images.dtype}: expected uint8 (or float with scale=)")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        hint = ""
        if images.ndim in (3, 4) and images.shape[-3] == 3:
            hint = " (channels first? move them last: np.moveaxis(images, -3, -1))"
        raise InputError(
            f"images of shape {images.shape}: expected (N, H, W, 3) or (H, W, 3), the 3 "
            f"channels last (pre-contrast, FLAIR, post-contrast){hint}"
        )
    if images.size == 0:
        raise InputError(f"images of shape {images.shape} hold no pixels: give at least one slice")
    given_float = images.dtype.kind == "f"
    if images.dtype.kind == "f" and scale is None:
        raise InputError(
            f"images are {images.dtype}: say their scale, scale=255 for values in [0, 1] "
            "or scale=1 for 0..255 (the model was trained on 0..255 uint8 TIFFs)"
        )
    if scale not in (None, 1):  # in float64, checked after: no overflow or underflow slips by
        images = images.astype(np.float64) * float(scale)
    if images.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(images)))
        if bad:
            raise InputError(f"images hold {bad} NaN or infinite value(s) (after scaling)")
    low, high = float(images.min()), float(images.max())
    if 0 < high < 1 or (given_float and 0 < high <= 1):
        raise InputError(
            f"images reach only {high:g} after scaling, not one step of 0..255: the scale "
            "is likely wrong (255 for images in [0, 1], 1 for 0..255)"
        )
    if low < 0 or high > 255 * (1 + 1e-3):
        raise InputError(
            f"images range over {low:g}..{high:g} after scaling, expected 0..255 (uint8 TIFFs): "
            f"rescale them (e.g. images / images.max() * 255), or pass the right scale="
        )
    return images.astype(np.float32)
