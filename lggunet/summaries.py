"""TensorBoard event files, written with tensorboardX (no TensorFlow needed).

Only process 0 writes; on the others every call does nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lggunet import parallel


class SummaryWriter:
    """Scalars and images under `logdir` (view with `tensorboard --logdir DIR`)."""

    def __init__(self, logdir: str | Path):
        self._writer = None
        if parallel.is_main_process():
            from tensorboardX import SummaryWriter as _Writer

            self._writer = _Writer(str(logdir), flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), global_step=step)

    def image(self, step: int, name: str, rgb: np.ndarray) -> None:
        """`rgb`: uint8 (H, W, 3)."""
        if self._writer is not None:
            self._writer.add_image(name, rgb, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
