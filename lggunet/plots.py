"""Pictures of a run: training curves and predicted contours over FLAIR. Figures are drawn
without pyplot, so importing lggunet leaves a notebook's matplotlib backend alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lggunet import files


def figure(**kwargs) -> Figure:
    """A matplotlib Figure with an Agg canvas (so layout and saving work), without pyplot."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


LOSS_TITLES = {
    "dice": "loss (-Dice, smooth=100)",
    "bce_dice": "loss (BCE - Dice, smooth=100)",
    "topk_bce_dice": "loss (BCE of the hardest 10% - Dice, smooth=100)",
}


def training_curves(
    metrics_jsonl: str | Path, out_png: str | Path, loss: str = "dice", tversky_beta: float = 0.5
) -> Path:
    """Loss, Dice (notebook and per-volume) and learning rate per epoch, from metrics.jsonl
    (the loss's overlap term a Tversky index when `tversky_beta` is not 0.5)."""
    records = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    epochs = [r["epoch"] for r in records]
    fig = figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    validated = [r for r in records if "val_loss" in r]  # none without a validation split
    val_epochs = [r["epoch"] for r in validated]
    axes[0].plot(epochs, [r["train_loss"] for r in records], label="train")
    if validated:
        axes[0].plot(val_epochs, [r["val_loss"] for r in validated], label="validation")
    title = LOSS_TITLES.get(loss, f"loss ({loss})")
    if tversky_beta != 0.5:
        title = title.replace("Dice", f"Tversky b={tversky_beta:g}")
    axes[0].set_title(title)
    axes[1].plot(epochs, [r["train_dice"] for r in records], label="train Dice (notebook)")
    if validated:
        axes[1].plot(val_epochs, [r["val_dice"] for r in validated], label="val Dice (notebook)")
        per_volume = [r["val_volume_dice"] for r in validated]
        axes[1].plot(val_epochs, per_volume, label="val per-volume Dice")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("Dice")
    axes[2].semilogy(epochs, [r["learning_rate"] for r in records])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    files.write_atomic(out_png, lambda p: fig.savefig(p, dpi=100))  # never half a PNG
    return Path(out_png)


def _contour_figure(images, masks, probs, titles, columns):
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    fig = figure(figsize=(3 * columns, 3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, mask, prob, title in zip(
        axes.ravel(), images, masks, probs, titles, strict=False
    ):
        ax.imshow(image[..., 1], cmap="gray")
        if mask.max() > 0:
            ax.contour(mask[..., 0], levels=[0.5], colors="lime", linewidths=1)
        if prob.max() > 0.5:
            ax.contour(prob[..., 0], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(title, fontsize=8)
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    return fig


def contour_grid(
    images: np.ndarray,
    masks: np.ndarray,
    probs: np.ndarray,
    titles: list[str],
    out_png: str | Path,
    columns: int = 4,
) -> Path:
    """FLAIR (channel 1) with the true (green) and predicted (red, p > 0.5) outlines."""
    fig = _contour_figure(images, masks, probs, titles, columns)
    files.write_atomic(out_png, lambda p: fig.savefig(p, dpi=100))  # never half a PNG
    return Path(out_png)


def contour_grid_image(
    images: np.ndarray, masks: np.ndarray, probs: np.ndarray, titles: list[str], columns: int = 4
) -> np.ndarray:
    """`contour_grid` as an RGB uint8 array (H, W, 3), e.g. for TensorBoard."""
    fig = _contour_figure(images, masks, probs, titles, columns)
    fig.set_dpi(80)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return rgb
