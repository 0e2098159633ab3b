"""The screening table of RESULTS.md: runs that share one validation split (>= 10 patients),
each scored on it at 256x256 (`report.evaluate_run(..., splits=("validation",))`), compared
per variant, with misses and the patients each run finds hardest. Reads only the runs' files
(final_metrics.json, metrics.jsonl, report.json, report_patients.csv).

    python bench/screening.py NAME=WORKDIR [NAME=WORKDIR ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = {"plain": "dice", "tta": "dice_tta", "lcc": "dice_lcc", "tta+lcc": "dice_tta_lcc"}
MISS = 0.1


def main() -> None:
    runs = [(arg.split("=", 1)[0], Path(arg.split("=", 1)[1])) for arg in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    print(
        "| run | epochs (best) | train min | val per-volume mean: plain | TTA | LCC | TTA + LCC "
        "| median (plain) | missed (< 0.1) | notebook Dice |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    per_patient = {}
    for name, workdir in runs:
        final = json.loads((workdir / "final_metrics.json").read_text())
        epochs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        minutes = sum(e.get("epoch_seconds", 0.0) for e in epochs) / 60
        report = json.loads((workdir / "report.json").read_text())
        notebook = report["splits"]["validation"]["notebook"]["plain"]["dice"]
        with (workdir / "report_patients.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "validation"]
        means = {v: np.mean([float(r[c]) for r in rows]) for v, c in VARIANTS.items()}
        plain = np.array([float(r["dice"]) for r in rows])
        per_patient[name] = {r["patient"][5:]: float(r["dice"]) for r in rows}
        print(
            f"| {name} | {len(epochs)} ({final['best_epoch']}) | {minutes:.0f} | "
            + " | ".join(f"{means[v]:.4f}" for v in VARIANTS)
            + f" | {np.median(plain):.4f} | {int((plain < MISS).sum())} of {len(plain)} | "
            f"{notebook:.4f} |"
        )
    patients = sorted(next(iter(per_patient.values())))
    print("\nPer validation patient (plain, per-volume Dice):\n")
    print("| patient | " + " | ".join(per_patient) + " |")
    print("| --- |" + " --- |" * len(per_patient))
    for p in patients:
        print(f"| {p} | " + " | ".join(f"{d[p]:.3f}" for d in per_patient.values()) + " |")


if __name__ == "__main__":
    main()
