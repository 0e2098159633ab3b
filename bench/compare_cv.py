"""Two cross-validations of the same folds compared patient by patient: for each variant (plain,
TTA, LCC, TTA + LCC) the mean per-volume Dice of each, the paired difference B - A with a 95%
bootstrap CI over patients, how many patients B scores better / worse, and B's misses.

    python bench/compare_cv.py runs/cv_a runs/cv_b

Reads each workdir's cv_patients.csv (written by the cross-validation); refuses two runs whose
patients or folds differ, since then the pairs would not be the same held-out patients.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from lggunet.cross_validation import bootstrap_ci

VARIANTS = {"plain": "dice", "TTA": "dice_tta", "LCC": "dice_lcc", "TTA + LCC": "dice_tta_lcc"}


def read(workdir: Path) -> dict[str, dict[str, str]]:
    path = workdir / "cv_patients.csv"
    if not path.is_file():
        sys.exit(f"{path}: not found (is {workdir} a finished cross-validation?)")
    with open(path) as f:
        return {row["patient"]: row for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the baseline cross-validation's workdir")
    parser.add_argument("b", type=Path, help="the one compared with it")
    args = parser.parse_args()
    a, b = read(args.a), read(args.b)
    if set(a) != set(b):
        sys.exit(f"the two runs hold different patients: {sorted(set(a) ^ set(b))}")
    moved = [p for p in a if a[p]["fold"] != b[p]["fold"]]
    if moved:
        sys.exit(f"the two runs put patients in different folds: {moved[:5]}")
    patients = sorted(a)
    print(f"{len(patients)} patients; A = {args.a}, B = {args.b}\n")
    print("| variant | A mean | B mean | B - A (95% CI) | B better / worse | B median | B missed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, column in VARIANTS.items():
        va = np.array([float(a[p][column]) for p in patients])
        vb = np.array([float(b[p][column]) for p in patients])
        d = vb - va
        lo, hi = bootstrap_ci(d)
        print(
            f"| {name} | {va.mean():.4f} | {vb.mean():.4f} | {d.mean():+.4f} ({lo:+.4f} to "
            f"{hi:+.4f}) | {(d > 1e-9).sum()} / {(d < -1e-9).sum()} | {np.median(vb):.4f} | "
            f"{(vb < 0.1).sum()} |"
        )
    column = VARIANTS["TTA"]
    d = {p: float(b[p][column]) - float(a[p][column]) for p in patients}
    print("\nLargest changes with TTA (B - A):")
    for p in sorted(patients, key=lambda p: -abs(d[p]))[:8]:
        print(f"  {p}: {float(a[p][column]):.3f} -> {float(b[p][column]):.3f} ({d[p]:+.3f})")


if __name__ == "__main__":
    main()
