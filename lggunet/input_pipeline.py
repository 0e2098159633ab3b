"""tfds `array_record` files -> grain -> batches of numpy arrays, padded to a fixed size.

Every batch is a dict: `image` uint8 (B, 256, 256, 3), `mask` uint8 (B, 256, 256, 1),
`valid` bool (B,) (False on padding), `slice_index` int32 (B,) and `patient_id` str (B,)
(the last two stay on the host). The last batch of an epoch is padded with copies of real
examples marked `valid=False`, so shapes stay static and every example is used exactly once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags

DEVICE_KEYS = ("image", "mask", "valid")


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Which examples go in which batch: `indices` and `valid`, both (num_batches, batch)."""

    indices: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def epoch_plan(
    num_examples: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> EpochPlan:
    """Batches covering this shard's examples once, in a per-(seed, epoch) random order.

    All shards get the same number of batches (the shorter ones pad), so hosts stay in step.
    """
    if num_examples <= 0:
        raise ValueError("cannot make batches from an empty split")
    order = np.arange(num_examples)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    mine = order[shard_index::shard_count]
    per_shard = -(-num_examples // shard_count)
    num_batches = -(-per_shard // batch_size)
    total = num_batches * batch_size
    valid = np.arange(total) < len(mine)
    indices = np.resize(mine, total)  # repeats real examples as padding
    return EpochPlan(indices.reshape(num_batches, batch_size), valid.reshape(num_batches, -1))


class _PlannedBatches:
    """A random-access source of whole batches: batch i of the plan, read and stacked."""

    def __init__(self, data_source: Sequence[dict], plan: EpochPlan):
        self._source = data_source
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        examples = [self._source[int(j)] for j in self._plan.indices[i]]
        return {
            "image": np.stack([e["image"] for e in examples]),
            "mask": np.stack([e["mask"] for e in examples]),
            "valid": self._plan.valid[i].copy(),
            "slice_index": np.array([e["slice_index"] for e in examples], np.int32),
            "patient_id": np.array([as_text(e["patient_id"]) for e in examples]),
        }


def as_text(value) -> str:
    """tfds Text features come back as bytes; returns str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def iterate(
    data_source: Sequence[dict],
    plan: EpochPlan,
    *,
    start: int = 0,
    num_threads: int = 4,
    num_workers: int = 0,
    prefetch: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the plan's batches from `start` on, read by grain threads (and worker processes).

    grain's worker processes (num_workers > 0) read absl flags; when the caller has not
    parsed any (library use, outside run.py), their defaults are taken.
    """
    dataset = grain.MapDataset.source(_PlannedBatches(data_source, plan))[start:]
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=prefetch)
    )
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers))
    return iter(iter_dataset)


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a batch that goes to the accelerator."""
    return {k: batch[k] for k in DEVICE_KEYS}
