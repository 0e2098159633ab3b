"""The one evaluator: a compiled `eval_step` run over every example of a split once, its
outputs gathered per example. Training scores its validation split with it every epoch,
`--mode=evaluate` every split, so both report the same numbers at the same resolution (the
slices' own, 256x256 for the Kaggle data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from lggunet import input_pipeline, metrics
from lggunet.errors import TrainingDiverged

NOTEBOOK_KEYS = ("loss", "dice", "iou", "accuracy")
COUNT_KEYS = ("intersection", "true_area", "pred_area")


@dataclasses.dataclass
class SplitScores:
    """Per-example results of one pass over a split, in the split's order.

    `notebook`: the batch formulas averaged over batches weighted by their real examples;
    `counts`: per-example pixel counts of p > 0.5 (`intersection`, `true_area`, `pred_area`);
    `labels`: the per-example values given to `run` (e.g. patient_id, slice_index);
    `same_channels` (N, 3) bool; `prediction` and `truth`: bit-packed (N, H, W // 8) masks,
    only when the step keeps predictions."""

    notebook: dict[str, float]
    counts: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    same_channels: np.ndarray
    prediction: np.ndarray | None = None
    truth: np.ndarray | None = None
    width: int = 0  # of the packed masks

    def __len__(self) -> int:
        return len(self.same_channels)


def run(
    eval_fn,
    state,
    plan: input_pipeline.EpochPlan,
    batches: Iterable[dict],
    labels: dict[str, Sequence],
    batch_keys: Sequence[str] = (),
) -> SplitScores:
    """Runs `eval_fn(state, batch)` over the batches of the global `plan`; `labels[k][i]` is
    example i's value of k, and each of `batch_keys` is read from the host part of the
    batches (single-process only: there a batch holds every row of the plan). `eval_fn`'s
    outputs must be addressable from this process (replicated, or one process). Raises
    TrainingDiverged on non-finite metrics."""
    labels = {k: np.asarray(v) for k, v in labels.items()}
    sums = dict.fromkeys(NOTEBOOK_KEYS, 0.0)
    weight = 0.0
    rows: dict[str, list] = {k: [] for k in (*COUNT_KEYS, "same_channels", *labels, *batch_keys)}
    packed: dict[str, list] = {"prediction": [], "truth": []}
    width = 0
    for row, batch in enumerate(batches):
        out = jax.device_get(eval_fn(state, input_pipeline.device_batch(batch)))
        w = float(out["count"])
        weight += w
        for k in NOTEBOOK_KEYS:
            sums[k] += float(out[k]) * w
        valid = plan.valid[row]
        index = plan.indices[row][valid]
        for k in labels:
            rows[k].append(labels[k][index])
        for k in batch_keys:
            rows[k].append(np.asarray(batch[k])[valid])
        for k in (*COUNT_KEYS, "same_channels"):
            rows[k].append(np.asarray(out[k])[valid])
        for k in packed:
            if k in out:
                width = out[k].shape[-1]
                packed[k].append(np.packbits(np.asarray(out[k])[valid], axis=-1))
    notebook = {k: v / max(weight, 1.0) for k, v in sums.items()}
    if not all(np.isfinite(v) for v in notebook.values()):
        raise TrainingDiverged(f"evaluation gave non-finite metrics {notebook}")
    joined = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
    return SplitScores(
        notebook=notebook,
        counts={k: joined[k] for k in COUNT_KEYS},
        labels={k: joined[k] for k in (*labels, *batch_keys)},
        same_channels=joined["same_channels"].reshape(-1, 3).astype(bool),
        **{k: np.concatenate(v) for k, v in packed.items() if v},
        width=width,
    )


def unpack(packed: np.ndarray, width: int) -> np.ndarray:
    """Bit-packed masks (N, H, ceil(W / 8)) back to bool (N, H, W)."""
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def summary(scores: SplitScores, patient_key: str = "patient_id") -> dict:
    """Notebook metrics, mean per-slice Dice and per-volume Dice (mean and per patient) of
    the plain prediction, as training logs them."""
    volumes = metrics.per_volume_dice(scores.labels[patient_key], **scores.counts)
    result = dict(scores.notebook)
    result["slice_dice"] = float(np.mean(metrics.per_slice_dice(**scores.counts)))
    result["volume_dice"] = float(np.mean(list(volumes.values())))
    result["num_slices"] = len(scores)
    result["per_volume_dice"] = volumes
    return result


def evaluate(
    eval_fn,
    state,
    plan: input_pipeline.EpochPlan,
    batches: Iterable[dict],
    patient_ids: Sequence[str],
) -> dict:
    """`summary` of `run`: what training records for a split each epoch."""
    return summary(run(eval_fn, state, plan, batches, {"patient_id": patient_ids}))
