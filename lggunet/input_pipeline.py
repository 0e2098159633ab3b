"""tfds `array_record` files -> grain -> batches of numpy arrays, padded to a fixed size.

Every batch is a dict: `image` uint8 (B, 256, 256, 3), `mask` uint8 (B, 256, 256, 1),
`valid` bool (B,) (False on padding), `volume_mean` and `volume_std` float32 (B, 3),
`brain_stats` float32 (B, 6, 3) (the patient's statistics, see `lggunet.normalization`), from
a `ContextSource` `context` uint8 (B, 2k, 256, 256, 3) (the neighbours' images), and,
kept on the host, `slice_index` int32, `tumour_area` int32 and `patient_id` str (B,). The last
batch of an epoch is padded with copies of real examples marked `valid=False`, so shapes stay
static and every example is used exactly once (or `repeats` times, when tumour slices are
oversampled).

Two ways to feed the accelerator: grain (threads, optional worker processes, prefetch to
device) or `DeviceCache`, which keeps a whole split on the device as uint8 and gathers batches
by index there.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags

from lggunet import context, parallel
from lggunet.errors import DataError

DEVICE_KEYS = ("image", "mask", "valid", "volume_mean", "volume_std", "brain_stats", "context")


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
    repeats: np.ndarray | None = None,
) -> EpochPlan:
    """Batches covering the split once (example i `repeats[i]` times, if given), in a
    per-(seed, epoch) random order; this shard's part of them.

    The global batch is `batch_size * shard_count`; shard k takes columns
    `[k * batch_size, (k + 1) * batch_size)` of every global batch, so the processes' parts
    concatenated in order are exactly the one-process plan with the global batch size, and all
    shards have the same number of batches. The last global batch is padded with repeated real
    examples marked invalid.
    """
    if num_examples <= 0:
        raise ValueError("cannot make batches from an empty split")
    order = np.arange(num_examples)
    if repeats is not None:
        order = np.repeat(order, repeats)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    global_batch = batch_size * shard_count
    num_batches = -(-len(order) // global_batch)
    total = num_batches * global_batch
    valid = (np.arange(total) < len(order)).reshape(num_batches, global_batch)
    indices = np.resize(order, total).reshape(num_batches, global_batch)  # pad: repeat examples
    columns = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    return EpochPlan(indices[:, columns], valid[:, columns])


class _PlannedBatches:
    """A random-access source of whole batches: batch i of the plan, read and stacked."""

    def __init__(self, data_source: Sequence[dict], plan: EpochPlan):
        self._source = data_source
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        examples = [self._source[int(j)] for j in self._plan.indices[i]]
        extra = {}
        for key in ("brain_stats", "context"):  # brain_stats: data prepared since 1.2.0
            if key in examples[0]:
                extra[key] = np.stack([e[key] for e in examples])
        return {
            **extra,
            "image": np.stack([e["image"] for e in examples]),
            "mask": np.stack([e["mask"] for e in examples]),
            "valid": self._plan.valid[i].copy(),
            "volume_mean": np.stack([e["volume_mean"] for e in examples]),
            "volume_std": np.stack([e["volume_std"] for e in examples]),
            "slice_index": np.array([e["slice_index"] for e in examples], np.int32),
            "tumour_area": np.array([e["tumour_area"] for e in examples], np.int32),
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
    return {k: batch[k] for k in DEVICE_KEYS if k in batch}


def prefetch_to_device(
    batches: Iterator[dict], size: int = 2, mesh: jax.sharding.Mesh | None = None
) -> Iterator[dict]:
    """Keeps `size` batches' device parts already transferred ahead of the consumer. With a
    `mesh`, each batch is this process's rows of a global batch sharded over its "data" axis."""
    queue: collections.deque = collections.deque()

    def put(batch):
        part = device_batch(batch)
        on_device = jax.device_put(part) if mesh is None else parallel.global_batch(part, mesh)
        return {**batch, **on_device}

    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def oversampling_repeats(tumour_area: np.ndarray, factor: float, seed: int, epoch: int):
    """How often each example appears this epoch: tumour slices `factor` times on average
    (the integer part always, the fraction by chance), the others once."""
    positive = np.asarray(tumour_area) > 0
    whole, frac = int(np.floor(factor)), factor - np.floor(factor)
    extra = np.random.default_rng([seed, epoch, 1]).random(len(positive)) < frac
    return np.where(positive, whole + extra, 1).astype(np.int64)


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
        table[ordered] = ordered[context.volume_neighbours(len(ordered), k)]
    return table


class ContextSource(Sequence):
    """A data source whose examples also carry `context`: the (2k, H, W, 3) uint8 images of
    their neighbours."""

    def __init__(self, source: Sequence[dict], k: int, patient_ids=None, slice_indices=None):
        """`patient_ids` and `slice_indices` of the examples, if known (else read from them)."""
        self.source, self.k = source, k
        if patient_ids is None or slice_indices is None:
            examples = (source[i] for i in range(len(source)))
            pairs = ((as_text(e["patient_id"]), int(e["slice_index"])) for e in examples)
            patient_ids, slice_indices = zip(*pairs, strict=True)
        if len(patient_ids) != len(source) or len(slice_indices) != len(source):
            raise ValueError("one patient id and slice number per example are needed")
        self.neighbours = neighbour_table([as_text(p) for p in patient_ids], slice_indices, k)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        example = dict(self.source[i])
        example["context"] = np.stack([self.source[int(j)]["image"] for j in self.neighbours[i]])
        return example


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


def read_field(data_source_factory, field: str) -> np.ndarray:
    """One scalar field of every example, reading without decoding the images.

    `data_source_factory(decoders)` returns the split's data source (e.g.
    `functools.partial(builder.as_data_source, split)`).
    """
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
    source = data_source_factory(decoders=skip)
    return np.array([source[i][field] for i in range(len(source))])


def _gather_rows(arrays: dict, idx: jax.Array, neighbours: jax.Array | None = None) -> dict:
    """The rows `idx` of every array: a batch gathered from the device cache; with the
    (N, 2k) `neighbours` table of a 2.5D source, their images as `context` too."""
    batch = jax.tree.map(lambda a: a[idx], arrays)
    if neighbours is not None:
        batch["context"] = arrays["image"][neighbours[idx]]
    return batch


class DeviceCache:
    """A whole split on the accelerator (uint8), batches gathered there by index.

    The full data set is about 1 GB as uint8 (a copy on every device of the mesh); use it
    when that fits beside the model. A 2.5D source (`ContextSource`) is held once, with its
    neighbour table: each batch's neighbours are gathered from it.
    """

    def __init__(
        self,
        data_source: Sequence[dict],
        num_threads: int = 8,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if jax.process_count() > 1:
            raise ValueError("the device cache works in single-process runs only")
        neighbours = None
        if isinstance(data_source, ContextSource):
            data_source, neighbours = data_source.source, data_source.neighbours
        plan = epoch_plan(len(data_source), 64, shuffle=False)
        parts = list(iterate(data_source, plan, num_threads=num_threads, prefetch=num_threads))
        host = {k: np.concatenate([p[k][p["valid"]] for p in parts]) for k in parts[0]}
        del host["valid"]
        self.host = {k: v for k, v in host.items() if k not in DEVICE_KEYS}
        # On every device of the mesh (replicated): each gathers its rows of a batch locally.
        place = self._place = None if mesh is None else parallel.replicated(mesh)
        self.device = jax.device_put({k: v for k, v in host.items() if k in DEVICE_KEYS}, place)
        self._neighbours = None  # a 2.5D source's (N, 2k) neighbour table, on the devices
        if neighbours is not None:
            self._neighbours = jax.device_put(neighbours.astype(np.int32), place)
        out = None if mesh is None else parallel.batch_sharded(mesh)
        self._gather = jax.jit(_gather_rows, out_shardings=out)  # named so in profiles
        self._valid_sharding = out

    def __len__(self) -> int:
        return len(self.host["slice_index"])

    def iterate(self, plan: EpochPlan, start: int = 0) -> Iterator[dict]:
        for i in range(start, len(plan)):
            idx = plan.indices[i]
            batch = {k: v[idx] for k, v in self.host.items()}
            idx = jax.device_put(idx, self._place)
            batch.update(self._gather(self.device, idx, self._neighbours))
            batch["valid"] = jax.device_put(plan.valid[i], self._valid_sharding)
            yield batch
