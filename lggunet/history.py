"""What a training run remembers between epochs and restarts: the running mean of the train
metrics, early stopping, and `metrics.jsonl` (one JSON record per epoch), with the log lines.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from lggunet import files


class LateReader:
    """Reads each train step's outputs `lag` steps late: with lag 1 the host fetches step
    k-1's metrics while step k runs, so the accelerator is never left idle waiting for the
    host; with lag 0 it waits for each step (needed where XLA's CPU all-reduce deadlocks
    with several steps in flight). `on_ready(step, outputs)` gets them in step order."""

    def __init__(self, on_ready, lag: int = 1):
        self.on_ready, self.lag = on_ready, lag
        self.pending: collections.deque = collections.deque()

    def push(self, step: int, outputs) -> None:
        self.pending.append((step, outputs))
        while len(self.pending) > self.lag:
            self._read()

    def flush(self) -> None:
        """Reads every step still pending (at the end of an epoch, before a save)."""
        while self.pending:
            self._read()

    def _read(self) -> None:
        step, outputs = self.pending.popleft()
        self.on_ready(step, jax.device_get(outputs))


class RunningMean:
    """Averages batch metrics weighted by each batch's number of real examples."""

    KEYS = ("loss", "dice", "iou", "accuracy")

    def __init__(self, sums: dict[str, float] | None = None, weight: float = 0.0):
        self.sums: dict[str, float] = dict(sums or {})
        self.weight = weight

    def add(self, batch_metrics: dict[str, Any]) -> None:
        w = float(batch_metrics["count"])
        self.weight += w
        for k in self.KEYS:
            self.sums[k] = self.sums.get(k, 0.0) + float(batch_metrics[k]) * w

    def result(self) -> dict[str, float]:
        return {k: v / max(self.weight, 1.0) for k, v in self.sums.items()}

    def to_json(self) -> dict:
        return {"sums": self.sums, "weight": self.weight}


@dataclasses.dataclass
class EarlyStopping:
    """Stops when val_loss has not improved by more than `min_delta` for `patience` epochs
    (patience 0: never). Its state travels in every checkpoint's record. Written out rather
    than taken from a library: Keras's semantics (strict improvement by min_delta, patience
    counted in epochs since the best) are what the notebook's users expect."""

    patience: int
    min_delta: float
    best_loss: float = float("inf")
    best_epoch: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Records the epoch's val_loss; True when training should stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = val_loss, epoch
        return self.should_stop(epoch)

    def should_stop(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.best_epoch >= self.patience

    def to_json(self) -> dict:
        best = self.best_loss if np.isfinite(self.best_loss) else None
        return {"best_loss": best, "best_epoch": self.best_epoch}

    def restored(self, saved: dict) -> EarlyStopping:
        best = saved["best_loss"]
        return dataclasses.replace(
            self,
            best_loss=float("inf") if best is None else best,
            best_epoch=saved["best_epoch"],
        )


def append(path: Path, record: dict) -> None:
    """Appends one epoch's record to metrics.jsonl."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def drop_epochs_after(path: Path, epoch: int) -> None:
    """Keeps metrics.jsonl consistent with the restored checkpoint on resume."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill mid-append: dropped, said
            if line.strip():
                logging.warning("%s: dropping an unreadable line (%r...)", path, line[:60])
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
            kept.append(line)
    files.write_atomic(path, "".join(line + "\n" for line in kept))


def restore_record(path: Path, meta: dict) -> None:
    """Appends the checkpoint's epoch record to metrics.jsonl if it is missing there (a kill
    between checkpoint and log)."""
    known = set()
    if path.exists():
        known = {json.loads(x)["epoch"] for x in path.read_text().splitlines() if x.strip()}
    if "train_loss" in meta and meta["epoch"] not in known:  # an end-of-epoch checkpoint
        append(path, {k: v for k, v in meta.items() if k not in ("early_stopping",)})


def fmt_seconds(s: float) -> str:
    s = int(s)
    return (
        f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    )


def validation_fields(val: dict | None) -> dict:
    """An epoch record's validation metrics (`val_*`); none without a validation split."""
    if val is None:
        return {}
    fields = {f"val_{k}": val[k] for k in ("loss", "dice", "iou", "accuracy")}
    return fields | {"val_slice_dice": val["slice_dice"], "val_volume_dice": val["volume_dice"]}


def epoch_line(record: dict, num_epochs: int) -> str:
    val = "no validation split"
    if "val_loss" in record:
        val = (
            f"val loss {record['val_loss']:.4f} dice {record['val_dice']:.4f} iou "
            f"{record['val_iou']:.4f} accuracy {100 * record['val_accuracy']:.2f}% "
            f"volume-dice {record['val_volume_dice']:.4f}"
        )
    return (
        f"epoch {record['epoch']}/{num_epochs}: train loss {record['train_loss']:.4f} dice "
        f"{record['train_dice']:.4f} | {val} | lr {record['learning_rate']:.2g} | "
        f"{record['images_per_s']:.1f} images/s"
    )


def final_line(epoch: int, split: str, result: dict, chosen: str = "best") -> str:
    return (
        f"{chosen} checkpoint (epoch {epoch}) on {split}: loss {result['loss']:.4f} dice "
        f"{result['dice']:.4f} iou {result['iou']:.4f} accuracy {100 * result['accuracy']:.2f}% | "
        f"per-volume Dice {result['volume_dice']:.4f} over {len(result['per_volume_dice'])} "
        f"patients, per-slice Dice {result['slice_dice']:.4f} (at the slices' own size)"
    )


@dataclasses.dataclass
class Clock:
    """Training's rates, leaving compiling out: images/s over this epoch's steps so far (no
    validation in it), the ETA over every step since the first one compiled."""

    batch_size: int = 1
    since: tuple[float, int] = (0.0, 0)  # (time, step) the ETA counts from
    epoch: tuple[float, int] = (0.0, 0)  # (time, step) images/s counts from
    compiled: bool = False  # the train step has run (compiled) once in this session

    def start(self, step: int) -> None:
        self.since = self.epoch = (time.perf_counter(), step)

    def new_epoch(self, step: int) -> None:
        self.epoch = (time.perf_counter(), step)

    def step_line(self, step: int, total: int, epoch: int, loss) -> tuple[str, float]:
        """("step s/total (epoch e): loss, images/s, ETA", images/s)."""
        now = time.perf_counter()
        overall = (step - self.since[1]) / max(now - self.since[0], 1e-9)
        images_per_s = self.batch_size * (step - self.epoch[1]) / max(now - self.epoch[0], 1e-9)
        eta = fmt_seconds((total - step) / max(overall, 1e-9))
        line = f"step {step}/{total} (epoch {epoch}): loss {float(loss):.4f}, "
        return line + f"{images_per_s:.1f} images/s, ETA {eta}", images_per_s
