"""Does the tumour bend `brain_zscore`? Per patient: the tumour's share of the foreground, and
the median z of normal tissue and of tumour per channel, under `brain_zscore` (mean / std over
the foreground) and a robust variant (median / (IQR / 1.349) over the same foreground); then,
over the patients, each figure's mean, spread and correlation with the tumour's share and
(given a cross-validation's per-patient CSV) with the Dice it scored.

    python bench/tumour_contrast.py --data=DIR_OF_KAGGLE_3M [--cv=results/cpu_recipe_cv5.csv]

No training; about a minute for 49 patients. Patients without tumour are left out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

import lggunet
from lggunet import normalization as norm

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


def patient_figures(images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The tumour's share of the foreground, and per channel c the median z of normal tissue
    (`zn<c>`, `rn<c>`) and of tumour (`zt<c>`, `rt<c>`): z by brain_zscore, r robust."""
    stats = norm.brain_statistics(images)
    pixels = images.reshape(-1, 3).astype(np.float32)
    tumour = masks.reshape(-1) > 0
    distance = np.abs(pixels - stats[norm.BACKGROUND]).max(axis=1)
    foreground = distance > stats[norm.THRESHOLD, 0]
    clipped = np.clip(pixels, stats[norm.LOW], stats[norm.HIGH])
    median = np.median(clipped[foreground], axis=0)
    q1, q3 = np.percentile(clipped[foreground], [25, 75], axis=0)
    spread = np.maximum((q3 - q1) / 1.349, 1.0)
    out = {"share": float(tumour[foreground].mean())}
    normal = foreground & ~tumour
    for c in range(3):
        z = (clipped[:, c] - stats[norm.MEAN, c]) / stats[norm.STD, c]
        r = (clipped[:, c] - median[c]) / spread[c]
        out |= {f"zn{c}": np.median(z[normal]), f"zt{c}": np.median(z[tumour])}
        out |= {f"rn{c}": np.median(r[normal]), f"rt{c}": np.median(r[tumour])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of patient folders")
    parser.add_argument("--cv", type=Path, help="a cv_patients.csv (or a kept results/*.csv)")
    parser.add_argument("--column", default="dice_tta", help="its Dice column (dice_tta)")
    args = parser.parse_args()
    dice = {}
    if args.cv:
        with open(args.cv) as f:
            rows = list(csv.DictReader(f))
        if rows and args.column not in rows[0]:
            sys.exit(f"{args.cv}: no column {args.column!r} (it has {', '.join(rows[0])})")
        dice = {row["patient"]: float(row[args.column]) for row in rows}
    rows = []
    for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
        patient = lggunet.read_patient(folder)
        masks = np.asarray(patient.masks)
        if not masks.any():
            print(f"{folder.name}: no tumour, left out")
            continue
        row = patient_figures(np.asarray(patient.images), masks)
        row["patient"] = folder.name.rsplit("_", 1)[0]
        rows.append(row)
        print(
            f"{row['patient']}: tumour share {row['share']:.3f}, FLAIR normal / tumour z "
            f"{row['zn1']:+.2f} / {row['zt1']:+.2f}, robust {row['rn1']:+.2f} / {row['rt1']:+.2f}",
            flush=True,
        )
    share = np.array([r["share"] for r in rows])
    d = np.array([dice.get(r["patient"], np.nan) for r in rows])
    scored = ~np.isnan(d)  # Dice correlations over the patients the CSV scores
    if dice:
        print(f"{scored.sum()} of them scored in {args.cv} ({args.column})")
    print(f"\n{len(rows)} patients; tumour share mean {share.mean():.3f}, max {share.max():.3f}")
    print("| channel, figure | mean | sd | corr. with share | corr. with Dice |")
    print("| --- | --- | --- | --- | --- |")
    figures = {"zn": "normal, z", "zt": "tumour, z", "rn": "normal, robust", "rt": "tumour, robust"}
    for c, channel in enumerate(CHANNELS):
        for key, what in figures.items():
            v = np.array([r[f"{key}{c}"] for r in rows])
            with_share = np.corrcoef(v, share)[0, 1]
            with_dice = "n/a"
            if scored.sum() > 2:
                with_dice = f"{np.corrcoef(v[scored], d[scored])[0, 1]:+.2f}"
            print(
                f"| {channel}, {what} | {v.mean():+.2f} | {v.std():.2f} | {with_share:+.2f} "
                f"| {with_dice} |"
            )


if __name__ == "__main__":
    main()
