"""Cross-validation of several recipe variants on one lent GPU, every fold of every variant a
process of its own, run side by side (a 2-core CPU runs one fold at a time: RESULTS.md).

    python bench/device_cv.py --data=DIR --out=DIR [--parallel=10] \\
        S= O2="--config.data.oversample_tumour=2" ...

Each NAME=OVERRIDES is `run.py --config=configs/cpu.py OVERRIDES` cross-validated as the CPU
command is (--folds, default 5, as configs/cpu.py), fold k trained by
`--config.data.cv_fold=k --workdir=RUNS/NAME`: the same files and report as one sequential
run. Overrides must leave the split alone (cv_folds, split_seed, split_fractions): every
variant shares the k prepared fold data sets, built first, one process per fold. When a
variant's folds are done, `run.py` without cv_fold writes its cv_report (finished folds are
skipped) and one JSON line of its per-volume Dice (mean, median, 95% CI, missed, per variant
of TTA / largest component) goes to OUT/cv.jsonl; OUT/cv.tgz then holds each variant's
cv_report.json/md, cv_patients.csv and every fold's metrics, report and log.
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
PREPARE = (
    "import sys; from absl import flags; from ml_collections import config_flags; "
    "from lggunet import dataset; "
    "c = config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); "
    "dataset.prepare(c.value.data)"
)


def base_flags(args) -> list[str]:
    return [
        "--config=configs/cpu.py",
        f"--config.data.manual_dir={args.data}",
        f"--config.data.data_dir={args.tfds}",
        f"--config.data.cv_folds={args.folds}",
    ]


def run_logged(cmd: list[str], log: Path) -> int:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    with log.open("a") as f:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=f).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="kaggle_3m folder or zip")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tfds", default="/tmp/tfds")
    ap.add_argument("--runs", default="/tmp/cv_runs", help="the variants' workdirs")
    ap.add_argument("--folds", type=int, default=5, help="data.cv_folds")
    ap.add_argument("--parallel", type=int, default=10)
    ap.add_argument("variants", nargs="+", help="NAME=OVERRIDES")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def prepare(fold: int) -> int:
        flags = [*base_flags(args), f"--config.data.cv_fold={fold}"]
        return run_logged([sys.executable, "-c", PREPARE, *flags], runs / f"prepare_{fold}.log")

    with concurrent.futures.ThreadPoolExecutor(args.folds) as pool:
        codes = list(pool.map(prepare, range(args.folds)))
    print(f"prepared {args.folds} folds in {time.time() - t0:.0f} s (exit codes {codes})")
    if any(codes):
        sys.exit(f"preparing failed: see {runs}/prepare_*.log")

    def train(job: tuple[str, str, int]) -> tuple[str, int, int]:
        name, overrides, fold = job
        cmd = [sys.executable, "run.py", *base_flags(args), *shlex.split(overrides)]
        cmd += [f"--config.data.cv_fold={fold}", f"--workdir={runs / name}"]
        code = run_logged(cmd, runs / f"{name}_fold{fold}.log")
        sys.stdout.write(f"{name} fold {fold}: exit {code} at {time.time() - t0:.0f} s\n")
        sys.stdout.flush()
        return name, fold, code

    jobs = [(n, o, k) for k in range(args.folds) for n, o in variants]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(train, jobs))
    with tarfile.open(out / "cv.tgz", "w:gz") as tar:
        for name, overrides in variants:
            if any(code for n, _, code in results if n == name):
                continue
            cmd = [sys.executable, "run.py", *base_flags(args), *shlex.split(overrides)]
            run_logged(cmd + [f"--workdir={runs / name}"], runs / f"{name}_report.log")
            report_path = runs / name / "cv_report.json"
            if not report_path.exists():
                print(f"{name}: no cv_report.json (see {runs / name}_report.log)")
                continue
            cv = json.loads(report_path.read_text())
            row = {"run": name, "overrides": overrides, "patients": cv["patients"]}
            for v, e in cv["variants"].items():
                row[v] = {k: e[k] for k in ("mean", "median", "ci95", "missed", "per_fold")}
            with (out / "cv.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            for f in ("cv_report.json", "cv_report.md", "cv_patients.csv"):
                tar.add(runs / name / f, arcname=f"{name}/{f}")
            for k in range(args.folds):
                for f in ("metrics.jsonl", "report.json", "report_patients.csv"):
                    path = runs / name / f"fold_{k}" / f
                    if path.exists():
                        tar.add(path, arcname=f"{name}/fold_{k}/{f}")
        for log in sorted(runs.glob("*.log")):
            tar.add(log, arcname=f"logs/{log.name}")
    print(f"cross-validation done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
