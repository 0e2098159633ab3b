"""Post-processing variants scored on a finished cross-validation: each patient predicted by the
fold model that never saw it (flip TTA, as `configs/cpu.py` predicts), thresholded at each of
`--thresholds`, then the binary volume kept as is, reduced to its largest 3D component, or
cleared of components smaller than N voxels. Prints the per-volume Dice mean / median / misses
of each variant, and the paired difference against "as is" at p > 0.5 with a bootstrap CI
over patients.

    python bench/postprocess_cv.py --cv=runs/cv --data=DIR_OF_KAGGLE_3M [--sizes=50,200,500]
        [--thresholds=0.3,0.4,0.5] [--checkpoint=last]

No training; reads cv_patients.csv for each patient's fold. CPU: about 2-4 minutes for 49
patients at 128x128.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

import lggunet
from lggunet import postprocessing, workdirs
from lggunet.cross_validation import bootstrap_ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sizes", default="50,100,200,500,1000")
    parser.add_argument("--thresholds", default="0.5")
    parser.add_argument("--checkpoint", default="best", help="each fold's 'best' or 'last'")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    if 0.5 not in thresholds:
        thresholds.insert(0, 0.5)
    with open(args.cv / "cv_patients.csv") as f:
        rows = list(csv.DictReader(f))
    folders = {p.name.rsplit("_", 1)[0]: p for p in args.data.iterdir() if p.is_dir()}
    models = {}
    variants: dict[str, list[float]] = {}
    for row in rows:
        fold = int(row["fold"])
        if fold not in models:
            models[fold] = lggunet.load_model(
                workdirs.fold_workdir(args.cv, fold), tta=True, checkpoint=args.checkpoint
            )
        patient = lggunet.read_patient(folders[row["patient"]])
        probs = models[fold](patient.images)
        truth = patient.masks
        for t in thresholds:
            pred = (probs > t).astype(np.uint8)
            at = "" if t == 0.5 else f"p > {t:g}, "
            largest = postprocessing.largest_component(pred)
            scores = {f"{at}as is": pred, f"{at}largest": largest}
            for n in sizes:
                scores[f"{at}drop < {n}"] = postprocessing.drop_small_components(pred, n)
            for name, mask in scores.items():
                variants.setdefault(name, []).append(lggunet.volume_dice(truth, mask))
        print(f"{row['patient']}: fold {fold}, as is {variants['as is'][-1]:.3f}", flush=True)
    base = np.asarray(variants["as is"])
    print(
        f"\n{len(base)} patients, each by the fold model that never saw it (flip TTA, "
        f"{args.checkpoint} checkpoint)"
    )
    print("| variant | mean | median | missed (< 0.1) | minus 'as is' (95% CI) | better / worse |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in variants.items():
        v = np.asarray(values)
        d = v - base
        lo, hi = bootstrap_ci(d)
        print(
            f"| {name} | {v.mean():.4f} | {np.median(v):.4f} | {(v < 0.1).sum()} | "
            f"{d.mean():+.4f} ({lo:+.4f} to {hi:+.4f}) | {(d > 1e-9).sum()} / {(d < -1e-9).sum()} |"
        )


if __name__ == "__main__":
    main()
