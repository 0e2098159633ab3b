"""2.5D input: each slice with its neighbours' images as extra channels (`data.context_slices`).

With k context slices the network sees 3 (2k + 1) channels: the slice's own (pre-contrast,
FLAIR, post-contrast), then those of the slices n-k .. n-1 and n+1 .. n+k of the same patient,
each normalised with the patient's statistics like the slice itself. Past a volume's ends the
nearest slice is repeated. In a data source, neighbours are found by slice number among the
examples of the same patient that the source holds (a patient-level split holds whole volumes;
in a slice-level split the nearest slice the split holds stands in for one it lacks).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lggunet import normalization
from lggunet.errors import DataError

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


def neighbour_table(patient_ids: Sequence[str], slice_indices: Sequence[int], k: int) -> np.ndarray:
    """(N, 2k) indices into the examples: each example's neighbours, by slice number among
    the examples of its patient (in any order), clamped at the patient's first and last."""
    ids = np.asarray([str(p) for p in patient_ids])
    numbers = np.asarray(slice_indices, np.int64)
    table = np.empty((len(ids), 2 * k), np.int64)
    for pid in np.unique(ids):
        members = np.flatnonzero(ids == pid)
        ordered = members[np.argsort(numbers[members], kind="stable")]
        repeated = np.flatnonzero(np.diff(numbers[ordered]) == 0)
        if len(repeated):
            raise DataError(
                f"patient {pid}: slice {numbers[ordered[repeated[0]]]} appears twice (two scans "
                "of one patient?): 2.5D input needs one volume per patient"
            )
        table[ordered] = ordered[volume_neighbours(len(ordered), k)]
    return table


class ContextSource(Sequence):
    """A data source whose examples also carry `context`: the (2k, H, W, 3) uint8 images of
    their neighbours."""

    def __init__(self, source: Sequence[dict], k: int, patient_ids=None, slice_indices=None):
        """`patient_ids` and `slice_indices` of the examples, if known (else read from them)."""
        self.source, self.k = source, k
        if patient_ids is None or slice_indices is None:
            examples = (source[i] for i in range(len(source)))
            pairs = ((_text(e["patient_id"]), int(e["slice_index"])) for e in examples)
            patient_ids, slice_indices = zip(*pairs, strict=True)
        if len(patient_ids) != len(source) or len(slice_indices) != len(source):
            raise ValueError("one patient id and slice number per example are needed")
        self.neighbours = neighbour_table([_text(p) for p in patient_ids], slice_indices, k)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        example = dict(self.source[i])
        example["context"] = np.stack([self.source[int(j)]["image"] for j in self.neighbours[i]])
        return example


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def with_context(
    source: Sequence[dict], k: int, patient_ids=None, slice_indices=None
) -> Sequence[dict]:
    """`source` whose examples carry their neighbours' images (itself for k = 0)."""
    if isinstance(source, ContextSource):
        if source.k == k:
            return source
        source = source.source
    if k == 0 or len(source) == 0:
        return source
    return ContextSource(source, k, patient_ids, slice_indices)


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
