"""Patient-level k-fold cross-validation: one model per fold, and one report over all folds.

`data.cv_folds = k` (k >= 2) turns a training run into k runs, `WORKDIR/fold_<i>/`, each an
ordinary workdir (resumable, evaluable, loadable): fold i's patients are its test set, a share
of the others (`data.split_fractions[1]` of all patients) its validation set for checkpoint
choice and the learning-rate schedule, the rest its training set (with a fraction of 0, no
validation set: every patient outside the fold trains). Folds are stratified by
institution (`lggunet.splits.cv_folds`). Every patient is scored exactly once, by the model
that never saw it, at the slices' own 256x256; `cv_report.json` / `.md`, `cv_patients.csv` and
`cv_volume_dice.png` in WORKDIR aggregate those scores. The fold models together are an
ensemble for new patients (`lggunet.load_model(WORKDIR)`, `--mode=predict`).

Rerunning the same command continues where it stopped: finished folds (a `fold_done.json`)
are skipped, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from lggunet import (
    configuration,
    dataset,
    files,
    kaggle3m,
    parallel,
    report,
    report_files,
    splits,
    workdirs,
)
from lggunet.errors import ConfigError

DONE_FILE = workdirs.FOLD_DONE_FILE
MISS = 0.1  # a patient whose per-volume Dice is below this counts as missed
VARIANT_COLUMNS = {"plain": "dice", "tta": "dice_tta", "lcc": "dice_lcc", "tta+lcc": "dice_tta_lcc"}
WEAK = 0.7  # patients under this per-volume Dice are sorted into under- and over-segmented
BOOTSTRAP_SAMPLES = 10_000


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    """A copy of `config` that trains fold `fold` only."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.cv_fold = fold
    return out


def _folds_to_run(config: ml_collections.ConfigDict) -> list[int]:
    folds, fold = config.data.cv_folds, config.data.cv_fold
    return list(range(folds)) if fold < 0 else [fold]


def _settings(config: ml_collections.ConfigDict) -> dict:
    """What makes two cross-validations the same split of the same data."""
    data = config.data
    return {
        "cv_folds": int(data.cv_folds),
        "split_seed": int(data.split_seed),
        "validation_fraction": float(tuple(data.split_fractions)[1]),
    }


def _check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses, before anything is written, a workdir that holds another kind of run or a
    cross-validation with another split."""
    saved = configuration.saved_config(workdir)
    if saved is not None and int(saved.data.cv_fold) >= 0:
        raise ConfigError(
            f"{workdir} is fold {saved.data.cv_fold} of a cross-validation; pass its parent "
            "folder as the workdir"
        )
    if (workdir / "checkpoints").is_dir():
        raise ConfigError(
            f"{workdir} holds a single training run (checkpoints/); cross-validate into "
            "another workdir"
        )
    if saved is None:
        return
    before = _settings(saved) if saved.data.cv_folds else {"cv_folds": 0}
    now = _settings(config)
    if before != now:
        differ = ", ".join(
            f"{k} {before.get(k)} -> {now[k]}" for k in now if before.get(k) != now[k]
        )
        raise ConfigError(
            f"{workdir} holds a cross-validation with other settings ({differ}); its folds "
            "would not fit together: use another workdir"
        )


def _fold_record(fconfig: ml_collections.ConfigDict, seconds: float) -> dict:
    builder = dataset.prepare(fconfig.data)  # already prepared: only opens it
    patients = builder.info.metadata["patients"]
    return {
        "fold": int(fconfig.data.cv_fold),
        **_settings(fconfig),
        "fingerprint": builder.info.metadata["fingerprint"],
        "num_patients": sum(len(v) for v in patients.values()),
        "test_patients": sorted(patients["test"]),
        "seconds": seconds,
    }


def _read_record(fold_dir: Path) -> dict:
    path = fold_dir / DONE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it to rescore that fold") from e


def _check_done_fold(fconfig: ml_collections.ConfigDict, fold_dir: Path) -> None:
    """A fold done earlier must come from the same split of the same data."""
    record = _read_record(fold_dir)
    expected = {**_settings(fconfig), "fold": int(fconfig.data.cv_fold)}
    expected["fingerprint"] = kaggle3m.open_source(
        dataset.locate_source(fconfig.data)
    ).fingerprint()
    differ = [k for k, v in expected.items() if record.get(k) != v]
    if differ:
        raise ConfigError(
            f"{fold_dir / DONE_FILE}: that fold was made with other {', '.join(differ)} (or "
            "other data) than this run: use another workdir"
        )


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains and scores every fold still to do (or only `data.cv_fold`), then writes the
    cross-validation report when all folds are done; returns it (None while folds remain)."""
    from lggunet import train

    parallel.use_host_devices(config)
    configuration.check(config)
    workdir = Path(workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir}: --workdir is a file, not a folder")
    _check_workdir(config, workdir)
    whole = ml_collections.ConfigDict(config.to_dict())
    whole.data.cv_fold = -1
    workdirs.check_resumable(whole, workdir, configuration.CONFIG_FILE)
    workdirs.make_writable_dir(workdir, "--workdir")
    configuration.save_config(whole, workdir)  # load_model(WORKDIR) reads the fold count here
    folds = config.data.cv_folds
    for fold in _folds_to_run(config):
        fold_dir = workdirs.fold_workdir(workdir, fold)
        fconfig = fold_config(config, fold)
        if (fold_dir / DONE_FILE).exists():
            _check_done_fold(fconfig, fold_dir)
            logging.info("Fold %d of %d: done earlier (%s)", fold, folds, fold_dir / DONE_FILE)
            continue
        logging.info("Fold %d of %d: training in %s", fold, folds, fold_dir)
        t0 = time.perf_counter()
        if not (fold_dir / workdirs.FINAL_METRICS_FILE).exists():
            train.train_and_evaluate(fconfig, str(fold_dir))
        report.evaluate_run(fconfig, fold_dir, splits=("validation", "test"))
        record = _fold_record(fconfig, time.perf_counter() - t0)
        files.write_atomic(fold_dir / DONE_FILE, json.dumps(record) + "\n")
    return write_report(workdir) if all_done(workdir, folds) else None


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`--mode=evaluate` on a cross-validation workdir: rescore every fold's validation and
    test patients with `config.evaluate`'s variants, then rewrite the report."""
    workdir = Path(workdir).expanduser()
    folds = workdirs.cv_folds_of(workdir)
    # The run's split and models, with this command's data paths and evaluate.* settings.
    saved = configuration.for_evaluation(configuration.saved_config(workdir), config)
    for fold in range(folds):  # every fold checked before any is rescored
        fold_dir = workdirs.fold_workdir(workdir, fold)
        if not (fold_dir / DONE_FILE).exists():
            raise ConfigError(
                f"{fold_dir}: fold {fold} of {folds} is not finished; rerun the training "
                "command to finish the cross-validation"
            )
        _check_done_fold(fold_config(saved, fold), fold_dir)
    for fold in range(folds):
        fconfig = fold_config(saved, fold)
        fold_dir = workdirs.fold_workdir(workdir, fold)
        report.evaluate_run(fconfig, fold_dir, splits=("validation", "test"))
    return write_report(workdir)


def all_done(workdir: Path, folds: int) -> bool:
    return all((workdirs.fold_workdir(workdir, k) / DONE_FILE).exists() for k in range(folds))


def bootstrap_ci(
    values, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling patients with replacement."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, (samples, v.size))
    means = v[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def is_a_series(patient: str) -> bool:
    """TCGA's later "A" series (e.g. TCGA_DU_A5TP), scanned unlike the earlier patients."""
    parts = patient.split("_")
    return len(parts) > 2 and parts[2].startswith("A")


def summarize(dice: list[float]) -> dict:
    v = np.asarray(dice, np.float64)
    lo, hi = bootstrap_ci(v)
    return {
        "patients": int(v.size),
        "mean": float(v.mean()) if v.size else float("nan"),
        "median": float(np.median(v)) if v.size else float("nan"),
        "ci95": [lo, hi],
        "missed": int((v < MISS).sum()),
    }


def _read_rows(fold_dir: Path, split: str) -> list[dict]:
    with (fold_dir / "report_patients.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _gather_folds(workdir: Path, folds: int) -> tuple[list[dict], list[dict], list[int]]:
    """(every fold's test rows with their fold, each fold's notebook table, its slices),
    checking that the folds test each patient exactly once."""
    rows, notebook, weights, seen = [], [], [], set()
    total = None
    for fold in range(folds):
        fold_dir = workdirs.fold_workdir(workdir, fold)
        record = _read_record(fold_dir)
        fold_rows = _read_rows(fold_dir, "test")
        tested = {r["patient"] for r in fold_rows}
        if tested != set(record["test_patients"]) or len(fold_rows) != len(tested):
            raise ConfigError(
                f"{fold_dir / 'report_patients.csv'}: its test patients are not fold {fold}'s "
                f"{len(record['test_patients'])}; rescore with --mode=evaluate"
            )
        if tested & seen or (total is not None and record["num_patients"] != total):
            raise ConfigError(f"{fold_dir}: its test patients overlap another fold's")
        seen |= tested
        total = record["num_patients"]
        rows += [{**r, "fold": fold} for r in fold_rows]
        test = json.loads((fold_dir / "report.json").read_text())["splits"]["test"]
        notebook.append(test["notebook"])
        weights.append(test["num_slices"])
    if total is not None and len(seen) != total:
        raise ConfigError(f"{workdir}: the folds test {len(seen)} of {total} patients")
    return rows, notebook, weights


def _variant_summary(rows: list[dict], column: str, folds: int) -> dict:
    """One variant's per-volume Dice over all patients, by institution, for the "A" series,
    the scans with one image in all channels, and per fold."""
    dice = [float(r[column]) for r in rows]
    entry = summarize(dice)
    by_inst: dict[str, list[float]] = {}
    for r, d in zip(rows, dice, strict=True):
        by_inst.setdefault(splits.institution_of(r["patient"]), []).append(d)
    entry["institutions"] = {k: summarize(by_inst[k]) for k in sorted(by_inst)}
    entry["a_series"] = summarize(
        [d for r, d in zip(rows, dice, strict=True) if is_a_series(r["patient"])]
    )
    entry["copied_all_channels"] = summarize(  # one image in all three channels
        [d for r, d in zip(rows, dice, strict=True) if r.get("copied_channels") == "all three"]
    )
    entry["weak"] = _weak_patients(rows, column)
    entry["per_fold"] = [
        float(np.mean([d for r, d in zip(rows, dice, strict=True) if r["fold"] == k]))
        for k in range(folds)
    ]
    return entry


def _weak_patients(rows: list[dict], column: str) -> dict | None:
    """How the patients under `WEAK` fail: under-segmented (recall below precision, or nothing
    marked: tumour left out) or over-segmented. Precision and recall follow from the areas
    and the Dice (intersection = Dice x (true + predicted area) / 2), so fold reports of any
    age serve; None where a row lacks the predicted area."""
    areas = column.replace("dice", "pred_area")
    if any(r.get(key) in (None, "") for r in rows for key in (areas, "true_area")):
        return None
    weak = [r for r in rows if float(r[column]) < WEAK]
    t = np.array([float(r["true_area"]) for r in weak])
    m = np.array([float(r[areas]) for r in weak])
    hit = np.array([float(r[column]) for r in weak]) * (t + m) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        p, q = np.where(m > 0, hit / m, np.nan), np.where(t > 0, hit / t, np.nan)
    under = (q < p) | ((m == 0) & (t > 0))  # nothing marked on a tumour

    def mean(v: np.ndarray) -> float:
        return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")

    return {
        "below": WEAK,
        "patients": len(weak),
        "under_segmented": sorted(r["patient"] for r, u in zip(weak, under, strict=True) if u),
        "mean_precision": mean(p),
        "mean_recall": mean(q),
    }


def write_report(workdir: str | Path) -> dict:
    """Aggregates the folds' test patients into cv_report.json / .md, cv_patients.csv and
    cv_volume_dice.png; returns the report."""
    workdir = Path(workdir).expanduser()
    folds = workdirs.cv_folds_of(workdir)
    rows, notebook, weights = _gather_folds(workdir, folds)
    variants = [v for v, col in VARIANT_COLUMNS.items() if rows and all(col in r for r in rows)]
    result = {
        "workdir": str(workdir),
        "folds": folds,
        "patients": len(rows),
        "slices": int(sum(weights)),
        "miss_threshold": MISS,
        "variants": {v: _variant_summary(rows, VARIANT_COLUMNS[v], folds) for v in variants},
        "notebook": {},
    }
    for name in notebook[0] if notebook else []:
        w = np.asarray(weights, np.float64)
        result["notebook"][name] = {
            key: float(np.dot([n[name][key] for n in notebook], w) / w.sum())
            for key in notebook[0][name]
        }
    result["best_variant"] = max(variants, key=lambda v: result["variants"][v]["mean"])
    result = report_files.json_safe(result)
    files.write_atomic(workdir / "cv_report.json", json.dumps(result, indent=2) + "\n")
    files.write_atomic(workdir / "cv_report.md", report_files.cv_markdown(result))
    fields = ["patient", "institution", "fold", "slices", "true_area", "copied_channels"]
    fields += [VARIANT_COLUMNS[v] for v in variants]
    fields += [
        VARIANT_COLUMNS[v].replace("dice", what)
        for what in ("precision", "recall")
        for v in variants
        if rows and all(VARIANT_COLUMNS[v].replace("dice", what) in r for r in rows)
    ]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["patient"]))
    files.write_atomic(workdir / "cv_patients.csv", table.getvalue())
    report_files.cv_plot(rows, workdir / "cv_volume_dice.png", MISS)
    plain = result["variants"]["plain"]
    logging.info(
        "Cross-validation over %d patients: per-volume Dice %.4f (median %.4f, 95%% CI "
        "%.4f-%.4f), %d missed; best variant %s. Wrote %s",
        len(rows),
        plain["mean"],
        plain["median"],
        *plain["ci95"],
        plain["missed"],
        result["best_variant"],
        workdir / "cv_report.md",
    )
    return result
