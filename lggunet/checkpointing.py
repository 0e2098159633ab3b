"""orbax checkpoints of the TrainState: keeps the latest epoch and the best by val_loss.

Each checkpoint is a folder `checkpoints/<epoch>/` with the state (`state/`) and the epoch's
metrics as JSON (`meta/`); orbax writes to a temporary folder and renames it when complete, so
an interrupted save is never taken for a whole checkpoint. Nothing here is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


class CheckpointStore:
    """Saves once per epoch; keeps the latest and the best (lowest val_loss) checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().absolute()
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=1),
                checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_val_loss, best_mode="min", create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, epoch: int, state: Any, record: dict) -> None:
        self.manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
            ),
            metrics={"val_loss": float(record["val_loss"])},
        )

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def best_epoch(self) -> int | None:
        return self.manager.best_step()

    def restore(self, epoch: int, template: Any) -> tuple[Any, dict]:
        """(state shaped like `template`, that epoch's metrics record)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def restore_latest(self, template: Any) -> tuple[Any, dict]:
        return self.restore(self.latest_epoch(), template)

    def restore_best(self, template: Any) -> tuple[Any, dict]:
        return self.restore(self.best_epoch(), template)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
