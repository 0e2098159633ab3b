"""Collects finished training runs (each evaluated with `--mode=evaluate`) into the Markdown
tables of RESULTS.md: the notebook's batch metrics and the per-volume Dice, per run and
variant. Reads only what the runs wrote (final_metrics.json, metrics.jsonl, report.json).

    python bench/results.py NAME=WORKDIR [NAME=WORKDIR ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def load(workdir: Path) -> dict:
    final = json.loads((workdir / "final_metrics.json").read_text())
    report = json.loads((workdir / "report.json").read_text())
    epochs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "epoch" in e and "train_loss" in e]
    return {"final": final, "report": report, "epochs": epochs}


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def main() -> None:
    runs = [(arg.split("=", 1)[0], Path(arg.split("=", 1)[1])) for arg in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    header = (
        "run | epochs (best) | train min | val per-volume | test notebook Dice / IoU / acc | "
        "test per-volume: plain | TTA | LCC | TTA + LCC | test per-patient (plain)"
    )
    print(f"| {header} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, workdir in runs:
        r = load(workdir)
        report, final = r["report"], r["final"]
        val = report["splits"].get("validation")  # none for a run without validation
        val = val and val["variants"]["plain"]["volume_dice"]["mean"]
        test = report["splits"]["test"]
        nb = test["notebook"]["plain"]
        variants = test["variants"]
        vd = {k: variants[k]["volume_dice"]["mean"] if k in variants else None for k in
              ("plain", "tta", "lcc", "tta+lcc")}  # fmt: skip
        minutes = sum(e.get("epoch_seconds", 0.0) for e in r["epochs"]) / 60
        with (workdir / "report_patients.csv").open() as f:
            rows = [row for row in csv.DictReader(f) if row["split"] == "test"]
        per_patient = ", ".join(f"{row['patient'][5:]} {float(row['dice']):.3f}" for row in rows)
        print(
            f"| {name} | {len(r['epochs'])} ({final.get('best_epoch', 'last')}) | "
            f"{minutes:.0f} | "
            f"{fmt(val)} | {fmt(nb['dice'])} / {fmt(nb['iou'])} / {100 * nb['accuracy']:.2f}% | "
            f"{fmt(vd['plain'])} | {fmt(vd['tta'])} | {fmt(vd['lcc'])} | {fmt(vd['tta+lcc'])} | "
            f"{per_patient} |"
        )
    print("\nAll at 256x256: `--mode=evaluate` maps predictions back to the slices' size.")


if __name__ == "__main__":
    main()
