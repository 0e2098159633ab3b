"""Python's garbage collector, kept out of the training loop's way, and its pauses counted.

A full (generation 2) collection walks every tracked Python object. Once jax, flax, orbax,
tfds and grain are imported and a run is set up that is over 200,000 objects, and one pass
holds the host for tens to hundreds of milliseconds (BENCHMARKS.md) every few epochs, at
steps nobody chose: while it runs no batch is fed and an accelerator waits. `SteadyHost`
collects when training starts and at each epoch's end, and moves what survives (the
libraries, the data's tables, the compiled steps and their caches) into the permanent
generation (`gc.freeze`), so that the full passes in between walk only what the loop made
since; on leaving it puts them back (`gc.unfreeze`), so that a later run in the same process
(cross-validation folds, research code) can reclaim them. `FullCollections` counts the full
passes that struck on their own and their time, for the epoch records
(`gc_full_collections`, `gc_full_ms`; the chosen pass at the epoch's end: `gc_epoch_end_ms`).
"""

from __future__ import annotations

import contextlib
import gc
import time

from absl import logging


class SteadyHost:
    """While entered, the objects that survive a collection are frozen: on entry, and again
    at each `again()` (the loop calls it once an epoch, when the compiled steps' and the
    epoch's long-lived objects exist). Where the process had frozen objects already (its own
    choice), they stay frozen on exit along with these; otherwise all are unfrozen."""

    def __init__(self) -> None:
        self._frozen_before = 0

    def __enter__(self) -> SteadyHost:
        self._frozen_before = gc.get_freeze_count()
        self.again()
        return self

    def again(self) -> float:
        """Collects and freezes what survives; returns the milliseconds it took."""
        t = time.perf_counter()
        gc.collect()
        gc.freeze()
        return 1000 * (time.perf_counter() - t)

    @property
    def frozen(self) -> int:
        return gc.get_freeze_count()

    def __exit__(self, *exc) -> None:
        if self._frozen_before == 0:
            gc.unfreeze()


class FullCollections:
    """Counts full (generation 2) collections, and the milliseconds they take, while entered;
    `take()` returns (count, ms) since the last call."""

    def __init__(self) -> None:
        self._count, self._ms, self._started = 0, 0.0, None
        self.paused = False  # set around chosen collections, which are not counted

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2 or self.paused:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._count += 1
            self._ms += 1000 * (time.perf_counter() - self._started)
            self._started = None

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def take(self) -> tuple[int, float]:
        out = (self._count, self._ms)
        self._count, self._ms = 0, 0.0
        return out


class LoopCollector:
    """A training loop's collector: `SteadyHost` and `FullCollections` while entered;
    `epoch_end()` makes the chosen pass and returns the epoch record's fields."""

    def __init__(self) -> None:
        self.steady, self.pauses = SteadyHost(), FullCollections()

    def __enter__(self) -> LoopCollector:
        self.steady.__enter__()  # its collection is a chosen one: not counted
        self.pauses.__enter__()
        logging.info("%d objects of the set-up kept out of full collections", self.steady.frozen)
        return self

    def __exit__(self, *exc) -> None:
        self.pauses.__exit__(*exc)
        self.steady.__exit__(*exc)

    def epoch_end(self) -> dict:
        count, ms = self.pauses.take()
        self.pauses.paused = True  # the chosen pass, between one epoch's steps and the next's
        try:
            chosen = self.steady.again()
        finally:
            self.pauses.paused = False
        return {"gc_full_collections": count, "gc_full_ms": ms, "gc_epoch_end_ms": chosen}
