"""Stop training cleanly on SIGTERM (preemption, `kill`) or SIGINT (Ctrl-C).

The first signal sets a flag that the training loop polls after every step (the processes of
a multi-process run agree on it every SIGNAL_EVERY_STEPS steps): it saves a checkpoint with
its position in the data and returns. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging

from lggunet import parallel

SIGNAL_EVERY_STEPS = 10  # how often the processes of a multi-process run agree on a signal


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerun to continue."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class StopRequest:
    """Context manager installing the handlers (main thread only) and restoring the old ones."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning(
            "Got %s: stopping after this step and saving a checkpoint (rerun to continue)",
            signal.Signals(signum).name,
        )

    def agreed(self, step: int) -> int:
        """The signal, if one arrived: looked at every step in one process; agreed across
        processes (a collective) every SIGNAL_EVERY_STEPS steps only."""
        if jax.process_count() == 1:
            return self.signum or 0
        if step % SIGNAL_EVERY_STEPS:
            return 0
        return parallel.max_over_processes(self.signum or 0)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
