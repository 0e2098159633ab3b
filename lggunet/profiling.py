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
        index = jax.process_index()  # one folder per process: hosts name their files alike
        self.log_dir = Path(workdir) / "tensorboard" / (f"process_{index}" if index else "")
        self.active = False
        if self.first and self.first > total:
            logging.warning(
                "profile.first_step=%d is beyond the run's last step (%d): nothing is traced",
                self.first,
                total,
            )
            self.first = 0
        elif self.first and self.first <= done:
            logging.info(
                "profile.first_step=%d was passed before this session (it resumes at step %d): "
                "nothing is traced",
                self.first,
                done + 1,
            )

    def marked(
        self, batches: Iterable[dict], step: int, state: Callable[[], Any]
    ) -> Iterator[dict]:
        """`batches`, each fetched and used (the loop's body runs at the `yield`) inside the
        "train" mark of its step, from number `step` on; the window's first batch is fetched
        before the trace starts (an epoch's end finds no batch: no trace of its evaluation);
        `state()` is waited for after the window's last step."""
        batches = iter(batches)
        while True:
            if step == self.first and not self.active:
                batch = next(batches, None)
                if batch is None:
                    return
                self._start()
                with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step):
                    yield batch
            else:
                with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step):
                    batch = next(batches, None)
                    if batch is None:
                        return
                    yield batch
            if self.active and step >= self.last:
                jax.block_until_ready(state())
                self.close()
            step += 1

    def _start(self) -> None:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir))
        except Exception as e:  # a trace already running, a folder not writable: train on
            logging.warning("profile: could not start the trace (%s); training goes on", e)
            self.first = 0
            return
        self.active = True
        logging.info("Tracing steps %d-%d into %s", self.first, self.last, self.log_dir)

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
