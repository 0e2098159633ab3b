"""What averaging models buys, measured on held-out patients: two or more cross-validations of
the same folds (different recipes or seeds), each patient predicted by every run's fold model
that never saw it, the probabilities averaged (flip TTA, threshold 0.5, components under
`--min-voxels` dropped, as `configs/cpu.py` predicts). Prints each run alone and the ensemble:
per-volume Dice mean / median / misses, and the paired difference of the ensemble against each
run, with a bootstrap 95% CI over patients.

    python bench/ensemble_cv.py runs/cv_a runs/cv_b [runs/cv_c ...] --data=DIR_OF_KAGGLE_3M
        [--checkpoint=last] [--min-voxels=500] [--limit=N] [--finished-folds]

`--finished-folds` takes only the folds every run has finished (a screen of folds 0-2, or a
run still training), their test patients read from each fold's `splits.json`.

The shipped predict averages the k fold models of one cross-validation, which a
cross-validation cannot score (every patient is held out by one fold model only); models of
the same held-out folds from other runs can, and this is the nearest honest estimate.
No training. CPU: about 3 minutes per run for 49 patients at 128x128.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import compare_cv  # bench/compare_cv.py
import numpy as np

import lggunet
from lggunet import inference, postprocessing, workdirs
from lggunet.cross_validation import MISS, bootstrap_ci


def read_folds(workdir: Path) -> dict[str, int]:
    """Patient -> the fold that held it out, from a finished cross-validation."""
    path = workdir / "cv_patients.csv"
    if not path.is_file():
        sys.exit(f"{path}: not found (is {workdir} a finished cross-validation?)")
    with open(path) as f:
        return {row["patient"]: int(row["fold"]) for row in csv.DictReader(f)}


def read_finished_folds(workdir: Path, folds: list[int]) -> dict[str, int]:
    """Patient -> fold for the test patients of `folds`, from each fold's splits.json."""
    out = {}
    for k in folds:
        record = workdirs.recorded_splits(workdirs.fold_workdir(workdir, k))
        if record is None:
            sys.exit(f"{workdirs.fold_workdir(workdir, k)}: no splits.json")
        out.update({p: k for p in record["patients"].get("test", [])})
    return out


def finished_folds(runs: list[Path]) -> list[int]:
    """The folds every run has finished (bench/compare_cv.py's test: a fold_done.json)."""
    common = sorted(set.intersection(*(compare_cv.finished(run) for run in runs)))
    if not common:
        sys.exit("the runs have no finished fold in common")
    return common


def same_folds(runs: list[Path], only_finished: bool = False) -> dict[str, int]:
    """The common patient -> fold map; exits if any run holds other patients or folds."""
    common = finished_folds(runs) if only_finished else None
    if common is not None:
        print(f"Only folds {common}, the ones every run has finished.")

    def read(run: Path) -> dict[str, int]:
        return read_folds(run) if common is None else read_finished_folds(run, common)

    folds = read(runs[0])
    for run in runs[1:]:
        other = read(run)
        if set(other) != set(folds):
            differ = sorted(set(other) ^ set(folds))
            sys.exit(f"{run} and {runs[0]} hold different patients: {differ[:5]}")
        moved = [p for p in folds if folds[p] != other[p]]
        if moved:
            sys.exit(f"{run} and {runs[0]} put patients in different folds: {moved[:5]}")
    return folds


def row(name: str, v: np.ndarray, ensemble: np.ndarray | None) -> str:
    """A table row: `v`'s mean, median and misses, and the ensemble's paired gain over `v`."""
    text = f"| {name} | {v.mean():.4f} | {np.median(v):.4f} | {(v < MISS).sum()} |"
    if ensemble is None:
        return text + " | |"
    d = ensemble - v
    lo, hi = bootstrap_ci(d)
    better, worse = (d > 1e-9).sum(), (d < -1e-9).sum()
    return text + f" {d.mean():+.4f} ({lo:+.4f} to {hi:+.4f}) | {better} / {worse} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="cross-validation workdirs")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, help="'best' or 'last' (default: each run's)")
    parser.add_argument("--min-voxels", type=int, default=500)
    parser.add_argument("--limit", type=int, default=0, help="only the first N patients (a check)")
    parser.add_argument(
        "--finished-folds",
        action="store_true",
        help="only the folds every run has finished (a screen of some folds, or a run training)",
    )
    args = parser.parse_args()
    if len(args.runs) < 2:
        sys.exit("give at least two cross-validation workdirs")
    folds = same_folds(args.runs, args.finished_folds)
    folders = {p.name.rsplit("_", 1)[0]: p for p in args.data.iterdir() if p.is_dir()}
    missing = sorted(set(folds) - set(folders))
    if missing:
        sys.exit(f"{args.data}: no folder for {missing[:5]}")
    models: dict[tuple[int, int], inference.Model] = {}
    single: list[list[float]] = [[] for _ in args.runs]
    ensemble: list[float] = []

    def score(truth: np.ndarray, probs: np.ndarray) -> float:
        pred = (probs > 0.5).astype(np.uint8)
        pred = postprocessing.drop_small_components(pred, args.min_voxels)
        return lggunet.volume_dice(truth, pred)

    for patient_id, fold in sorted(folds.items())[: args.limit or None]:
        patient = lggunet.read_patient(folders[patient_id])
        probs = []
        for i, run in enumerate(args.runs):
            if (i, fold) not in models:
                models[i, fold] = lggunet.load_model(
                    workdirs.fold_workdir(run, fold), tta=True, checkpoint=args.checkpoint
                )
            probs.append(models[i, fold](patient.images))
            single[i].append(score(patient.masks, probs[-1]))
        ensemble.append(score(patient.masks, np.mean(probs, axis=0)))
        alone = ", ".join(f"{s[-1]:.3f}" for s in single)
        print(f"{patient_id}: fold {fold}, alone {alone}, averaged {ensemble[-1]:.3f}", flush=True)
    runs = [np.asarray(s) for s in single]
    ens = np.asarray(ensemble)
    print(
        f"\n{len(ens)} patients, each by the fold models that never saw it (flip TTA, "
        f"checkpoint: {args.checkpoint or 'each run its own'}, components < {args.min_voxels} "
        "voxels dropped)"
    )
    print("| model | mean | median | missed (< 0.1) | ensemble - it (95% CI) | better / worse |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run, v in zip(args.runs, runs, strict=True):
        print(row(str(run), v, ens))
    print(row("ensemble (probabilities averaged)", ens, None))


if __name__ == "__main__":
    main()
