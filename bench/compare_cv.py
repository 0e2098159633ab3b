"""Two cross-validations of the same folds compared patient by patient: for each variant (plain,
TTA, LCC, TTA + LCC) the mean per-volume Dice of each, the paired difference B - A with a 95%
bootstrap CI over patients, how many patients B scores better / worse, and B's misses.

    python bench/compare_cv.py runs/cv_a runs/cv_b
    python bench/compare_cv.py runs/cv_a runs/cv_b --finished-folds   # B still training
    python bench/compare_cv.py results/cv_cpu.csv runs/cv_b            # a kept baseline
    python bench/compare_cv.py A_seed0,A_seed1 B_seed0,B_seed1          # seeds averaged

Reads each workdir's cv_patients.csv (written by the cross-validation), or such a file itself
(results/ keeps those of the cross-validations RESULTS.md reports); refuses two runs whose
patients or folds differ, since then the pairs would not be the same held-out patients. With
--finished-folds it reads instead the test patients of every fold that both runs have finished
(a fold_done.json), from each fold's report_patients.csv: a look at a cross-validation before
its last folds are done, said as such in the first line. A side given as several runs
separated by commas (e.g. two seeds of one recipe) is scored per patient as the mean of its
runs, which must hold the same patients in the same folds.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

from lggunet.cross_validation import bootstrap_ci

# Differences below this are ties (a kept table holds 6 decimals).
TIE = 1e-5
VARIANTS = {"plain": "dice", "TTA": "dice_tta", "LCC": "dice_lcc", "TTA + LCC": "dice_tta_lcc"}


def _rows(path: Path, key_columns: set[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        sys.exit(f"{path}: cannot be read ({e})")
    if not rows or not key_columns | {"dice"} <= set(rows[0]):
        need = ", ".join(sorted(key_columns | {"dice"}))
        sys.exit(f"{path}: not a cross-validation's patient table (no rows, or not {need})")
    return rows


def scores(rows: dict[str, dict[str, str]], patients: list[str], column: str) -> np.ndarray:
    try:
        return np.array([float(rows[p][column]) for p in patients])
    except ValueError as e:
        sys.exit(f"a {column} that is not a number: {e}")


def read(run: Path) -> dict[str, dict[str, str]]:
    """A cross-validation's patients: its workdir's cv_patients.csv, or that file itself."""
    path = run if run.is_file() else run / "cv_patients.csv"
    if not path.is_file():
        sys.exit(f"{path}: not found (is {run} a finished cross-validation?)")
    return {row["patient"]: row for row in _rows(path, {"patient", "fold"})}


def read_finished_folds(workdir: Path, folds: list[int]) -> dict[str, dict[str, str]]:
    rows = {}
    for k in folds:
        path = workdir / f"fold_{k}" / "report_patients.csv"
        if not path.is_file():
            sys.exit(f"{path}: not found, though fold {k} is marked done")
        for row in _rows(path, {"patient", "split"}):
            if row["split"] == "test":
                rows[row["patient"]] = {**row, "fold": str(k)}
    return rows


def finished(run: Path) -> set[int]:
    """The folds of `run` that are done: all of a kept cv_patients.csv's, or a workdir's
    fold_<k>/ folders that hold a fold_done.json."""
    if run.is_file():
        return {int(row["fold"]) for row in read(run).values()}
    if not run.is_dir():
        sys.exit(f"{run}: not found")
    folds = [p for p in run.glob("fold_*") if re.fullmatch(r"fold_(0|[1-9][0-9]*)", p.name)]
    if not folds:
        sys.exit(f"{run}: not a cross-validation (no fold_<k>/ folders in it)")
    return {int(p.name[5:]) for p in folds if (p / "fold_done.json").is_file()}


def read_folds(run: Path, folds: list[int]) -> dict[str, dict[str, str]]:
    if run.is_file():
        return {p: row for p, row in read(run).items() if int(row["fold"]) in folds}
    return read_finished_folds(run, folds)


def read_group(runs: list[Path], folds: list[int] | None) -> dict[str, dict[str, str]]:
    """The patients of one side: one run's rows, or several runs' scores averaged per patient
    (on `folds` only, when given)."""
    tables = [read(run) if folds is None else read_folds(run, folds) for run in runs]
    first = tables[0]
    for run, table in zip(runs[1:], tables[1:], strict=True):
        if set(table) != set(first):
            sys.exit(
                f"{runs[0]} and {run} hold different patients: {sorted(set(table) ^ set(first))}"
            )
        moved = [p for p in first if first[p]["fold"] != table[p]["fold"]]
        if moved:
            sys.exit(f"{runs[0]} and {run} put patients in different folds: {moved[:5]}")
    if len(tables) == 1:
        return first
    merged = {}
    for p, row in first.items():
        merged[p] = {"patient": p, "fold": row["fold"]}
        for column in VARIANTS.values():
            if all(column in table[p] for table in tables):
                try:
                    values = [float(table[p][column]) for table in tables]
                except ValueError as e:
                    sys.exit(f"a {column} that is not a number: {e}")
                merged[p][column] = repr(float(np.mean(values)))
    return merged


def _runs(side: str) -> list[Path]:
    return [Path(part) for part in side.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "a",
        type=_runs,
        help="the baseline cross-validation's workdir, or its cv_patients.csv (several, "
        "comma-separated: their mean per patient)",
    )
    parser.add_argument("b", type=_runs, help="the one compared with it (the same)")
    parser.add_argument(
        "--finished-folds",
        action="store_true",
        help="compare only the folds both runs have finished (for a run still training)",
    )
    args = parser.parse_args()
    names = {side: ",".join(map(str, runs)) for side, runs in (("a", args.a), ("b", args.b))}
    if not args.a or not args.b:
        sys.exit("give a run (or runs) on each side")
    folds = None
    if args.finished_folds:
        folds = sorted(set.intersection(*map(finished, args.a + args.b)))
        if not folds:
            sys.exit(f"{names['a']} and {names['b']} have no finished fold in common")
        print(f"Only folds {folds}, the ones all runs have finished.")
    a, b = read_group(args.a, folds), read_group(args.b, folds)
    if set(a) != set(b):
        sys.exit(f"the two runs hold different patients: {sorted(set(a) ^ set(b))}")
    moved = [p for p in a if a[p]["fold"] != b[p]["fold"]]
    if moved:
        sys.exit(f"the two runs put patients in different folds: {moved[:5]}")
    patients = sorted(a)
    if not patients:
        sys.exit(f"{names['a']} and {names['b']}: no test patients to compare")
    variants = {
        n: c for n, c in VARIANTS.items() if all(c in r for r in [*a.values(), *b.values()])
    }
    print(f"{len(patients)} patients; A = {names['a']}, B = {names['b']}")
    for side, runs in (("A", args.a), ("B", args.b)):
        if len(runs) > 1:
            print(f"{side}: per patient, the mean of its {len(runs)} runs")
    left_out = sorted(set(VARIANTS) - set(variants))
    if left_out:
        print(f"Not scored in both runs, so not compared: {', '.join(left_out)}")
    print()
    print("| variant | A mean | B mean | B - A (95% CI) | B better / worse | B median | B missed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, column in variants.items():
        va, vb = scores(a, patients, column), scores(b, patients, column)
        d = vb - va
        lo, hi = bootstrap_ci(d)
        print(
            f"| {name} | {va.mean():.4f} | {vb.mean():.4f} | {d.mean():+.4f} ({lo:+.4f} to "
            f"{hi:+.4f}) | {(d > TIE).sum()} / {(d < -TIE).sum()} | {np.median(vb):.4f} | "
            f"{(vb < 0.1).sum()} |"
        )
    shown = "TTA" if "TTA" in variants else "plain"
    column = VARIANTS[shown]
    d = {p: float(b[p][column]) - float(a[p][column]) for p in patients}
    print(f"\nLargest changes, {shown} (B - A):")
    for p in sorted(patients, key=lambda p: -abs(d[p]))[:8]:
        print(f"  {p}: {float(a[p][column]):.3f} -> {float(b[p][column]):.3f} ({d[p]:+.3f})")


if __name__ == "__main__":
    main()
