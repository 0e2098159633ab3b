"""TensorBoard event files, written with tensorboardX (no TensorFlow needed), and the
predictions drawn into them and into the run's pictures.

Only process 0 writes; on the others every call does nothing.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import logging

from lggunet import input_pipeline, metrics, parallel, plots


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


def predict_examples(
    predict_fn, state, source, tumour_area: np.ndarray, mesh, count: int = 8
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Predictions on `count` tumour-bearing slices spread over the split (by index order),
    with a title per slice (patient, slice number, Dice)."""
    positive = np.flatnonzero(tumour_area > 0)
    if len(positive) == 0:
        positive = np.arange(len(source))
    chosen = positive[np.linspace(0, len(positive) - 1, min(count, len(positive))).astype(int)]
    plan = input_pipeline.EpochPlan(chosen[None, :], np.ones((1, len(chosen)), bool))
    batch = next(input_pipeline.iterate(source, plan))
    device = parallel.replicate(input_pipeline.device_batch(batch), mesh)
    out = jax.device_get(predict_fn(state, device))
    dice = metrics.per_slice_dice(**jax.device_get(metrics.slice_stats(out["mask"], out["prob"])))
    titles = [
        f"{pid} #{idx}  Dice {d:.2f}"
        for pid, idx, d in zip(batch["patient_id"], batch["slice_index"], dice, strict=True)
    ]
    return out, titles


def draw_validation(writer, predict_fn, state, feed, mesh, step: int, count: int) -> None:
    """`count` validation slices' predictions drawn into TensorBoard (none for count 0 or
    without a validation split)."""
    if count == 0 or "validation" not in feed.sources:
        return
    out, titles = predict_examples(
        predict_fn, state, feed.sources["validation"], feed.tumour_area["validation"], mesh, count
    )
    rgb = plots.contour_grid_image(out["image"], out["mask"], out["prob"], titles)
    writer.image(step, "validation/contours", rgb)


def draw_final(predict_fn, state, feed, mesh, workdir: Path, count: int) -> None:
    """curves.png (metrics.jsonl) and <split>_predictions.png: the chosen checkpoint on
    test slices (validation without a test split, none without either); 8 slices when
    `count` is 0."""
    shown = next((s for s in ("test", "validation") if s in feed.sources), None)
    if shown is not None:
        out, titles = predict_examples(
            predict_fn, state, feed.sources[shown], feed.tumour_area[shown], mesh, count or 8
        )
    if parallel.is_main_process():
        curves = workdir / "curves.png"
        config = feed.config
        plots.training_curves(workdir / "metrics.jsonl", curves, config.loss, config.tversky_beta)
        logging.info("Wrote %s", curves)
        if shown is not None:
            grid = workdir / f"{shown}_predictions.png"
            plots.contour_grid(out["image"], out["mask"], out["prob"], titles, grid)
            logging.info("Wrote %s", grid)
