"""Screening on a lent GPU: one-change variants of a recipe, trained side by side on one fixed
patient split and each scored on its validation patients at 256x256 (all four variants: plain,
TTA, largest component, both), as RESULTS.md's screening rounds are on the CPU.

    python bench/device_screening.py --data=DIR --out=DIR [--parallel=4] \\
        S= L="--config.loss=dice" I192="--config.data.image_size=192" ...

Each NAME=OVERRIDES trains `run.py --config=configs/cpu.py --config.data.cv_folds=0` with the
screening split (--split, default 70% train / 30% validation of the patients, seed 0) and
--epochs, plus OVERRIDES (space-separated flags). The prepared data is built once, before the
runs start, so that they share it. Runs go `--parallel` at a time on the one GPU (no memory
preallocation). After each run: `report.evaluate_run(..., splits=("validation",))` writes
report.json and report_patients.csv in its workdir, and one JSON line with its validation
scores is appended to OUT/screening.jsonl (so a run cut off by a time limit still leaves the
finished ones). `--ensemble=NAME=A,B,C` then scores the averaged probabilities of finished
runs A, B, C the same way (one more line). At the end bench/screening.py prints the table and
OUT/screening.tgz holds every run's small files (log, metrics, reports, per-patient CSV,
pictures); the workdirs stay in --runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Builds the prepared data of the config given by the flags that follow (one process).
PREPARE = (
    "import sys; from absl import flags; from ml_collections import config_flags; "
    "from lggunet import dataset; "
    "c = config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); "
    "dataset.prepare(c.value.data)"
)
SMALL_FILES = (
    "config.json",
    "metrics.jsonl",
    "final_metrics.json",
    "report.json",
    "report.md",
    "report_patients.csv",
    "report_volume_dice.png",
    "curves.png",
)


def base_flags(args) -> list[str]:
    return [
        "--config=configs/cpu.py",
        "--config.data.cv_folds=0",
        f"--config.data.manual_dir={args.data}",
        f"--config.data.data_dir={args.tfds}",
        f"--config.data.split_fractions={args.split}",
        f"--config.num_epochs={args.epochs}",
    ]


def prepare(args) -> None:
    """Builds the split's prepared data once (every variant reads the same)."""
    subprocess.run([sys.executable, "-c", PREPARE, *base_flags(args)], cwd=REPO, check=True)


def run_variant(name: str, overrides: str, args) -> dict:
    workdir = Path(args.runs) / name
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    t0 = time.time()
    log = (Path(args.runs) / f"{name}.log").open("w")
    cmd = [sys.executable, "run.py", *base_flags(args), f"--workdir={workdir}"]
    train = subprocess.run(cmd + shlex.split(overrides), cwd=REPO, env=env, stdout=log, stderr=log)
    train_s = time.time() - t0
    if train.returncode:
        error = f"train exit {train.returncode}"
        return _record({"run": name, "overrides": overrides, "error": error}, args)
    code = (
        "import sys; from lggunet import configuration, report; "
        "wd = sys.argv[1]; r = report.evaluate_run(configuration.saved_config(wd), wd, "
        "splits=('validation',)); v = r['splits']['validation']['variants']; "
        "print('SCORES', __import__('json').dumps({k: [m['volume_dice']['mean'], "
        "m['volume_dice']['median']] for k, m in v.items()}))"
    )
    ev = subprocess.run(
        [sys.executable, "-c", code, str(workdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    log.write(ev.stdout + ev.stderr)
    line = [x for x in ev.stdout.splitlines() if x.startswith("SCORES ")]
    row = {"run": name, "overrides": overrides, "train_s": round(train_s, 1)}
    row.update(json.loads(line[0][7:]) if line else {"error": f"evaluate exit {ev.returncode}"})
    return _record(row, args)


def _record(row: dict, args) -> dict:
    """Appends one result line to OUT/screening.jsonl (a cut-off call keeps the finished runs)."""
    with (Path(args.out) / "screening.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def ensemble_scores(name: str, members: list[str], args) -> dict:
    """Validation scores of the members' averaged probabilities (inference.Ensemble), scored as
    report.evaluate_run scores one model."""
    sys.path.insert(0, str(REPO))
    from lggunet import configuration, dataset, inference, report

    workdirs = [Path(args.runs) / m for m in members]
    missing = [w.name for w in workdirs if not (w / "report.json").exists()]
    if missing:
        return _record({"run": name, "error": f"members not finished: {missing}"}, args)
    configs = [configuration.saved_config(w) for w in workdirs]
    config = configs[0]
    # score_source feeds every member the first one's input: they must share it.
    same = ("data.image_size", "data.normalize", "data.context_slices", "model.features")
    differ = [
        f for f in same if len({str(c[f.split(".")[0]][f.split(".")[1]]) for c in configs}) > 1
    ]
    if differ:
        return _record({"run": name, "error": f"members differ in {differ}"}, args)
    weights = tuple(inference.load_model(w).weights for w in workdirs)  # one architecture
    source = dataset.prepare(config.data).as_data_source()["validation"]
    split = report.score_source(weights, source, config, tta=True)
    scores = report.score_split(split, config)[0]["variants"]
    row = {"run": name, "overrides": "ensemble of " + ",".join(members)}
    for variant, v in scores.items():
        row[variant] = [v["volume_dice"]["mean"], v["volume_dice"]["median"]]
    return _record(row, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="kaggle_3m folder or zip")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tfds", default="/tmp/tfds")
    ap.add_argument("--runs", default="/tmp/screening_runs", help="the runs' workdirs")
    ap.add_argument("--split", default="(0.7,0.3,0.0)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ensemble", action="append", default=[], help="NAME=RUN,RUN,... (after)")
    ap.add_argument("variants", nargs="+", help="NAME=OVERRIDES")
    args = ap.parse_args()
    bad = [v for v in args.variants + [e for e in args.ensemble] if "=" not in v]
    if bad:
        ap.error(f"expected NAME=OVERRIDES (or NAME=RUN,RUN for --ensemble), got {bad}")
    variants = [v.split("=", 1) for v in args.variants]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare(args)
    print(f"prepared in {time.time() - t0:.0f} s", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda v: run_variant(v[0], v[1], args), variants))
    for spec in args.ensemble:
        name, members = spec.split("=", 1)
        ensemble_scores(name, members.split(","), args)
    runs = Path(args.runs)
    done = [f"{n}={runs / n}" for n, _ in variants if (runs / n / "report.json").exists()]
    with tarfile.open(Path(args.out) / "screening.tgz", "w:gz") as tar:
        for name, _ in variants:
            for f in SMALL_FILES:
                if (runs / name / f).exists():
                    tar.add(runs / name / f, arcname=f"{name}/{f}")
            if (runs / f"{name}.log").exists():
                tar.add(runs / f"{name}.log", arcname=f"{name}/train.log")
    if done:
        subprocess.run([sys.executable, "bench/screening.py", *done], cwd=REPO)
    print(f"screening done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
