"""Checkpoint fault injection, run in a subprocess by tests/test_faults.py.

python -m tests.helpers.checkpoint_worker loop DIR MB
    saves checkpoints 1, 2, ... of a MB-sized state determined by the step number, forever
    (continuing after the latest readable one); the test kill -9s it mid-save.
python -m tests.helpers.checkpoint_worker fsize DIR
    with a 1 MiB file-size limit (a full disk, as far as writes can tell), saves a small
    checkpoint 1, then a 4 MiB checkpoint 2 and waits for it: prints the CheckpointError and
    exits 3.
"""

from __future__ import annotations

import resource
import signal
import sys

import numpy as np

from lggunet.checkpointing import CheckpointError, CheckpointStore


def state(step: int, mb: float) -> dict:
    """Random (incompressible) weights determined by the step, and the step itself."""
    w = np.random.default_rng(step).random(int(mb * 2**18), np.float32)
    return {"w": w, "b": np.full(3, step, np.float32)}


def loop(directory: str, mb: float) -> None:
    store = CheckpointStore(directory)
    step = 0
    if store.latest_step() is not None:
        _, meta = store.restore_latest(state(0, mb))
        step = meta["epoch"]
    while True:
        step += 1
        store.wait()  # saves are asynchronous: one in flight at a time, as in training
        print(f"saving {step}", flush=True)
        store.save(step, state(step, mb), {"epoch": step, "val_loss": -float(step)})
        print(f"saved {step}", flush=True)


def fsize(directory: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    store = CheckpointStore(directory)
    store.save(1, state(1, 0.05), {"epoch": 1, "val_loss": -1.0})
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    try:
        store.save(2, state(2, 4), {"epoch": 2, "val_loss": -2.0})
        store.wait()  # the write runs in the background: its failure surfaces here
    except CheckpointError as e:
        print(f"CheckpointError: {e}", flush=True)
        sys.exit(3)
    print("saved 2 (unexpected)", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop(sys.argv[2], float(sys.argv[3]))
    else:
        fsize(sys.argv[2])
