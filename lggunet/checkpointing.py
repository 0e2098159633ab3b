"""orbax checkpoints of the TrainState: keeps the latest and the best (by val_loss).

Each checkpoint is a folder `checkpoints/<step>/` (the global training step) with the state
(`state/`) and a JSON record (`meta/`): the epoch's metrics for an end-of-epoch checkpoint, or
the position in the epoch for one saved on an interrupt (those carry no val_loss and are never
"best"). orbax writes to a temporary folder and renames it when complete, so an interrupted
save (kill -9, power loss) is never taken for a whole checkpoint. Saves are asynchronous: the
arrays are copied off the devices, then written while training goes on; the next save (and
`wait`, at the end and on an interrupt) waits for it, so a failed write (a full disk)
surfaces there as a CheckpointError naming the step, leaving earlier checkpoints as they were.
A checkpoint that cannot be read back is skipped with a warning for the previous one. In
multi-process runs every process calls `save` (the writes are collective). Nothing here is
unpickled.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from lggunet.errors import LggUnetError


class CheckpointError(LggUnetError):
    """A checkpoint could not be written or read; the message says which and why."""


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def _damaged_records(directory: Path) -> list[int]:
    """Steps whose orbax JSON records (metrics, checkpoint metadata) do not parse."""
    if not directory.is_dir():
        return []
    bad = []
    for step_dir in directory.iterdir():
        if not step_dir.name.isdigit():
            continue
        for rel in ("metrics/metrics", "_CHECKPOINT_METADATA"):
            path = step_dir / rel
            try:
                if path.exists():
                    json.loads(path.read_bytes())
            except (OSError, ValueError):
                bad.append(int(step_dir.name))
                break
    return sorted(bad)


class CheckpointStore:
    """Keeps the latest checkpoint and the best (lowest val_loss) end-of-epoch one."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().absolute()
        # orbax reads every checkpoint's JSON records when it opens the folder and fails on a
        # damaged one: such checkpoints are moved aside first, as unreadable ones are below.
        self._move_aside(_damaged_records(self.directory), "its JSON records cannot be read")
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=1),
                checkpoint_managers.BestN(
                    get_metric_fn=_val_loss,
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_val_loss,
            best_mode="min",
            create=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._pending: tuple[int, list[int]] | None = None  # (step, steps before) in flight

    def save(self, step: int, state: Any, record: dict) -> None:
        """Starts saving `state` as checkpoint `step` and returns once its arrays are copied
        off the devices; the files are written in the background (`wait` to finish). A failed
        write surfaces as a CheckpointError at the next `save` or `wait`, naming the step.
        `record` must hold val_loss when it is an end-of-epoch checkpoint (without it the
        checkpoint only counts as the latest)."""
        self.wait()  # the previous save first: its failure is reported as its own
        metrics = {"val_loss": float(record["val_loss"])} if "val_loss" in record else None
        before = sorted(self.manager.all_steps())
        self._pending = (step, before)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
                ),
                metrics=metrics,
                force=True,
            )
        except Exception as e:  # OSError, tensorstore's ValueError, ... on a full disk
            self._pending = None
            raise self._write_error(step, before, e) from e

    def _write_error(self, step: int, before: list[int], e: Exception) -> CheckpointError:
        return CheckpointError(
            f"could not write checkpoint {step} in {self.directory} "
            f"({type(e).__name__}: {e}). Earlier checkpoints are untouched: steps {before}"
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def restore(self, step: int, template: Any) -> tuple[Any, dict]:
        """(state shaped and sharded like `template`, that checkpoint's record)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def restore_weights(self, step: int, abstract: dict) -> tuple[dict, dict]:
        """(only the parts of checkpoint `step`'s state named in `abstract`, e.g. {"params",
        "batch_stats"} as shape/dtype structs, on the default device; its record). What
        inference needs, without the optimizer's moments."""
        path = self.directory / str(step) / "state"
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
        )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        weights = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True
            ),
        )
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(weights), {**dict(meta.meta), "checkpoint_step": step}

    def _restore_first_good(self, steps: list[int], restore) -> tuple[Any, dict]:
        failed: list[tuple[int, str]] = []  # (step, error type)
        for step in steps:
            try:
                state, meta = restore(step)
            except Exception as e:  # a corrupted or truncated checkpoint
                logging.warning(
                    "Checkpoint %s/%d cannot be read (%s: %s); trying the previous one",
                    self.directory,
                    step,
                    type(e).__name__,
                    str(e)[:300],
                )
                failed.append((step, type(e).__name__))
                continue
            if failed:
                self._quarantine([bad for bad, _ in failed if bad > step])
                logging.warning("Restored checkpoint %d instead of %d", step, failed[0][0])
            return state, meta
        tried = ", ".join(f"{bad}: {kind}" for bad, kind in failed) or "none"
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {tried})")

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints newer than the restored one out of the way, so
        training can save those step numbers again."""
        self._move_aside(steps, "it cannot be read")
        self.manager.reload()

    def _move_aside(self, steps: list[int], why: str) -> None:
        """Moves checkpoints to `<dir>_unreadable/<step>-<time>[-n]`, warning for each."""
        if not steps or jax.process_index() != 0:
            return
        target = self.directory.parent / f"{self.directory.name}_unreadable"
        target.mkdir(exist_ok=True)
        for step in steps:
            source = self.directory / str(step)
            if source.exists():
                destination = target / f"{step}-{int(time.time())}"
                n = 1
                while destination.exists():
                    destination, n = target / f"{step}-{int(time.time())}-{n}", n + 1
                shutil.move(str(source), str(destination))
                logging.warning("Moved checkpoint %s (%s) to %s", source, why, destination)

    def _best_first(self) -> list[int]:
        best = self.best_step()
        rest = sorted((s for s in self.manager.all_steps() if s != best), reverse=True)
        return ([best] if best is not None else []) + rest

    def restore_latest(self, template: Any) -> tuple[Any, dict]:
        """The newest checkpoint that reads back whole (older ones on failure, warned)."""
        return self.restore_chosen("last", template)

    def restore_best(self, template: Any) -> tuple[Any, dict]:
        """The best checkpoint by val_loss, or the next readable one (warned)."""
        return self.restore_chosen("best", template)

    def _chosen_first(self, checkpoint: str | int) -> list[int]:
        """The steps to try for `checkpoint`: "best" (lowest val_loss) or "last" (the newest),
        each followed by the others as fallbacks, or one step number."""
        if checkpoint == "best":
            return self._best_first()
        if checkpoint == "last":
            return sorted(self.manager.all_steps(), reverse=True)
        return [checkpoint]

    def restore_chosen(self, checkpoint: str, template: Any) -> tuple[Any, dict]:
        """The whole state of `checkpoint` ("best" or "last"), or the next readable one."""
        return self._restore_first_good(
            self._chosen_first(checkpoint), lambda step: self.restore(step, template)
        )

    def restore_chosen_weights(self, checkpoint: str | int, abstract: dict) -> tuple[dict, dict]:
        """`restore_weights` of `checkpoint` ("best", "last", or a step number), falling back
        to the next readable one (warned) for the named ones."""
        return self._restore_first_good(
            self._chosen_first(checkpoint), lambda step: self.restore_weights(step, abstract)
        )

    def wait(self) -> None:
        """Waits for the save in flight, if any; a CheckpointError if it failed."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if pending is None:
                raise CheckpointError(f"a save in {self.directory} failed ({e})") from e
            raise self._write_error(*pending, e) from e

    def close(self) -> None:
        self.manager.close()
