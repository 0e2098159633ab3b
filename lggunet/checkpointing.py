"""orbax checkpoints of the TrainState: keeps the latest and the best (by val_loss).

Each checkpoint is a folder `checkpoints/<step>/` (the global training step) with the state
(`state/`) and a JSON record (`meta/`): the epoch's metrics for an end-of-epoch checkpoint, or
the position in the epoch for one saved on an interrupt (those carry no val_loss and are never
"best"). orbax writes to a temporary folder and renames it when complete, so an interrupted
save is never taken for a whole checkpoint. In multi-process runs every process calls `save`
(the writes are collective). Nothing here is unpickled.
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
    """Keeps the latest checkpoint and the best (lowest val_loss) end-of-epoch one."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().absolute()
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
            preservation_policy=policy, best_fn=_val_loss, best_mode="min", create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, record: dict) -> None:
        """Saves `state` as checkpoint `step`; `record` must hold val_loss when it is an
        end-of-epoch checkpoint (without it the checkpoint only counts as the latest)."""
        metrics = {"val_loss": float(record["val_loss"])} if "val_loss" in record else None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
            ),
            metrics=metrics,
            force=True,
        )

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

    def restore_latest(self, template: Any) -> tuple[Any, dict]:
        return self.restore(self.latest_step(), template)

    def restore_best(self, template: Any) -> tuple[Any, dict]:
        return self.restore(self.best_step(), template)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
