"""Where training and evaluation batches come from, as global arrays on the device mesh.

Each process reads only its own rows of every global batch (grain threads, optional worker
processes, prefetch to the devices) or gathers them from a device-resident cache.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from lggunet import input_pipeline
from lggunet.errors import ConfigError


class Feed:
    """Batches of the prepared splits for one training run."""

    def __init__(self, config: ml_collections.ConfigDict, builder, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.sources = builder.as_data_source()
        if "train" not in self.sources:
            raise ConfigError("the prepared data has no 'train' split")
        if "validation" not in self.sources and config.data.split_fractions[1] > 0:
            raise ConfigError("the prepared data has no 'validation' split")
        self.read = {"num_threads": config.data.num_threads, "num_workers": config.data.num_workers}
        self.shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
        fields = {}
        for field in ("tumour_area", "patient_id", "slice_index"):
            fields[field] = {
                split: input_pipeline.read_field(
                    functools.partial(builder.as_data_source, split), field
                )
                for split in self.sources
            }
        self.tumour_area = fields["tumour_area"]
        self.patient_id = {
            split: np.array([input_pipeline.as_text(x) for x in ids])
            for split, ids in fields["patient_id"].items()
        }
        if config.data.context_slices:  # 2.5D: each example with its neighbours' images
            self.sources = {
                split: input_pipeline.with_context(
                    source,
                    config.data.context_slices,
                    self.patient_id[split],
                    fields["slice_index"][split],
                )
                for split, source in self.sources.items()
            }
        self.cache = {}
        if config.data.device_cache:
            for split in ("train", "validation"):
                if split in self.sources:
                    self.cache[split] = input_pipeline.DeviceCache(self.sources[split], mesh=mesh)
            logging.info("Device cache: %s held on the device as uint8", " and ".join(self.cache))
        factor = config.data.oversample_tumour
        if factor != 1.0:
            areas = self.tumour_area["train"]
            logging.info(
                "Oversampling tumour slices x%.2f: %d of %d training slices carry tumour; an "
                "epoch has about %d examples instead of %d",
                factor,
                int((areas > 0).sum()),
                len(areas),
                int(len(areas) + (factor - 1) * (areas > 0).sum()),
                len(areas),
            )

    def train_plan(self, epoch: int) -> input_pipeline.EpochPlan:
        """This process's rows of the epoch's global batches."""
        config = self.config
        repeats = None
        if config.data.oversample_tumour != 1.0:
            repeats = input_pipeline.oversampling_repeats(
                self.tumour_area["train"], config.data.oversample_tumour, config.seed, epoch
            )
        return input_pipeline.epoch_plan(
            len(self.sources["train"]),
            config.batch_size // jax.process_count(),
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            repeats=repeats,
            **self.shard,
        )

    def batches(self, split: str, plan: input_pipeline.EpochPlan, start: int = 0) -> Iterator[dict]:
        """The plan's batches from `start` on; device keys are global sharded arrays."""
        if split in self.cache:
            return self.cache[split].iterate(plan, start=start)
        return input_pipeline.prefetch_to_device(
            input_pipeline.iterate(self.sources[split], plan, start=start, **self.read),
            mesh=self.mesh,
        )

    def eval_batches(self, split: str) -> tuple[input_pipeline.EpochPlan, Iterator[dict]]:
        """(the global plan, its batches): every example of the split once, in order."""
        n, batch = len(self.sources[split]), self.config.eval_batch_size
        global_plan = input_pipeline.epoch_plan(n, batch, shuffle=False)
        local_plan = input_pipeline.epoch_plan(
            n, batch // jax.process_count(), shuffle=False, **self.shard
        )
        return global_plan, self.batches(split, local_plan)
