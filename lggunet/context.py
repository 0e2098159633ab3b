"""2.5D input: each slice with its neighbours' images as extra channels (`data.context_slices`).

With k context slices the network sees 3 (2k + 1) channels: the slice's own (pre-contrast,
FLAIR, post-contrast), then those of the slices n-k .. n-1 and n+1 .. n+k of the same patient,
each normalised with the patient's statistics like the slice itself. Past a volume's ends the
nearest slice is repeated. A prepared split finds them by slice number among its examples of
the same patient (`input_pipeline.with_context`; whole volumes: the split is by patient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lggunet import normalization

CHANNELS = 3  # channels of one slice: pre-contrast, FLAIR, post-contrast


def input_channels(context_slices: int) -> int:
    """The network's input channels with `context_slices` neighbours on each side."""
    return CHANNELS * (2 * context_slices + 1)


def offsets(k: int) -> list[int]:
    """The neighbours' positions relative to the slice, in channel order."""
    return [*range(-k, 0), *range(1, k + 1)]


def volume_neighbours(num_slices: int, k: int) -> np.ndarray:
    """(num_slices, 2k) indices of each slice's neighbours in an ordered volume, clamped to
    the first and last slice."""
    position = np.arange(num_slices)[:, None] + np.array(offsets(k), np.int64)[None, :]
    return np.clip(position, 0, num_slices - 1).reshape(num_slices, 2 * k)


def normalize_stacked(
    images, context, normalize: str, volume_mean=None, volume_std=None, brain_stats=None
) -> jax.Array:
    """The network's input: `images` (B, H, W, 3) normalised, then each of the `context`
    (B, 2k, H, W, 3) neighbours (None: none) normalised with the same statistics, stacked
    as channels: (B, H, W, 3 (2k + 1))."""
    stats = (volume_mean, volume_std, brain_stats)
    x = normalization.normalize_images(images, normalize, *stats)
    if context is None:
        return x
    parts = [
        normalization.normalize_images(context[:, j], normalize, *stats)
        for j in range(context.shape[1])
    ]
    return jnp.concatenate([x, *parts], axis=-1)
