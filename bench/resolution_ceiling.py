"""The per-volume Dice a perfect model would reach at each input size: every patient's true
masks resized to SIZE as training sees them (bilinear, then >= 0.5: binary targets), resized
back as the predictions are (bilinear, then > 0.5), scored against the masks at their own
256x256. Answers whether the input size limits the accuracy (it costs 1 - ceiling at most).
Also the ceiling of a model that learnt the soft targets (the bilinear masks, not
thresholded), whose probabilities carry the boundary's sub-pixel position.

    python bench/resolution_ceiling.py --data=DIR_OF_KAGGLE_3M [--sizes=96,128,160,192]

No model; about a minute for 49 patients on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

import lggunet
from lggunet import steps


def round_trip(masks: np.ndarray, size: int, binary: bool = True) -> np.ndarray:
    """(D, H, W) {0, 1} -> the same masks after SIZE x SIZE and back, as lggunet.steps does
    (`binary`: the small masks thresholded, as the training targets are)."""
    d, h, w = masks.shape
    batch = {
        "image": np.zeros((d, h, w, 3), np.uint8),
        "mask": masks[..., None],
        "valid": np.ones(d, bool),
    }
    _, small, _ = steps.preprocess(batch, size, "scale", soft=not binary)  # training's resize
    back = jax.image.resize(small, (d, h, w, 1), "linear")  # as steps.probabilities
    return np.asarray(back[..., 0] > 0.5, np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a kaggle_3m folder")
    parser.add_argument("--sizes", default="96,128,160,192")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    folders = sorted(p for p in args.data.iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f"{args.data}: no patient folders")
    ceiling: dict[int, list[float]] = {s: [] for s in sizes}
    soft: dict[int, list[float]] = {s: [] for s in sizes}
    for folder in folders:
        truth = lggunet.read_patient(folder).masks
        if not truth.any():
            print(f"{folder.name}: no tumour, left out")
            continue
        for s in sizes:
            ceiling[s].append(lggunet.volume_dice(truth, round_trip(truth, s)))
            soft[s].append(lggunet.volume_dice(truth, round_trip(truth, s, binary=False)))
        scores = ", ".join(f"{s}: {ceiling[s][-1]:.4f}" for s in sizes)
        print(f"{folder.name}: {int(truth.sum())} tumour pixels; {scores}", flush=True)
    print(f"\n{len(ceiling[sizes[0]])} patients with tumour")
    print("| input size | mean ceiling | lowest | below 0.99 | soft targets: mean | lowest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in sizes:
        v, w = np.asarray(ceiling[s]), np.asarray(soft[s])
        print(
            f"| {s} | {v.mean():.4f} | {v.min():.4f} | {(v < 0.99).sum()} | {w.mean():.4f} | "
            f"{w.min():.4f} |"
        )


if __name__ == "__main__":
    main()
