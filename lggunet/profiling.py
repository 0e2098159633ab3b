"""A jax.profiler trace of a window of training steps (`profile.first_step`, `profile.steps`).

The trace goes to `WORKDIR/tensorboard/plugins/profile/<time>/` (TensorBoard's profile tab,
Perfetto, or `bench/profile_loop.py`); each step's host work (fetching the batch, launching
the step) is marked "train" with its step number, so that a reader can tell the steps apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

STEP_NAME = "train"  # the name of every step's jax.profiler.StepTraceAnnotation


class StepWindow:
    """Starts the trace before step `profile.first_step` (1-based; 0: never) and stops it after
    `profile.steps` steps, once the last one's device work is done; as a context manager it
    also stops a trace that training left inside the window (an interrupt, an error)."""

    def __init__(self, profile: ml_collections.ConfigDict, workdir: Path, total: int, done: int):
        self.first, self.last = profile.first_step, profile.first_step + profile.steps - 1
        self.log_dir = Path(workdir) / "tensorboard"
        self.active = False
        if self.first and self.first > total:
            logging.warning(
                "profile.first_step=%d is beyond the run's last step (%d): nothing is traced",
                self.first,
                total,
            )
            self.first = 0  # not even the fetch that finds the run's data at an end
        elif self.first and self.first <= done:
            logging.warning(
                "profile.first_step=%d was passed before this session (it resumes at step %d): "
                "nothing is traced",
                self.first,
                done + 1,
            )

    def marked(self, batches: Iterable, step: int, state: Callable[[], Any]) -> Iterator:
        """`batches`, each fetched and used (the loop's body runs at the `yield`) inside the
        "train" mark of its step, from number `step` on; `state()` is waited for at the end."""
        batches = iter(batches)
        while True:
            if step == self.first and not self.active:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.log_dir))
                self.active = True
                logging.info("Tracing steps %d-%d into %s", self.first, self.last, self.log_dir)
            with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step):
                batch = next(batches, None)
                if batch is None:
                    return
                yield batch
            if self.active and step >= self.last:
                jax.block_until_ready(state())
                self.close()
            step += 1

    def close(self) -> None:
        """Stops a trace in progress."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            logging.info("Trace written under %s", self.log_dir)

    def __enter__(self) -> StepWindow:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
