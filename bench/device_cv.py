"""Cross-validation of several recipe variants on one lent GPU, every fold of every variant a
process of its own, run side by side (a 2-core CPU runs one fold at a time: RESULTS.md).

    python bench/device_cv.py --data=DIR --out=DIR [--parallel=10] \\
        S= O2="--config.data.oversample_tumour=2" ...

Each NAME=OVERRIDES is `run.py --config=configs/cpu.py OVERRIDES` cross-validated as the CPU
command is (--folds, default 5, as configs/cpu.py), fold k trained by
`--config.data.cv_fold=k --workdir=RUNS/NAME`: the same files and report as one sequential
run. Overrides must leave the split alone (cv_folds, split_seed, split_fractions): every
variant shares the k prepared fold data sets, built first, one process per fold. As soon as
a variant's last fold is done, `run.py` without cv_fold writes its cv_report (its finished folds
are skipped), one JSON line of its per-volume Dice (mean, median, 95% CI, missed, per fold, for
each of plain / TTA / largest component) goes to OUT/cv.jsonl, and OUT/<NAME>.tgz gets its
cv_report.json/md, cv_patients.csv and every fold's metrics, report and log: a call cut off by
its time limit keeps the variants already finished. Name at most 6 variants (8 files come
back from a call).
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
import threading
import time
from pathlib import Path

from device_screening import PREPARE  # bench/ is first on sys.path

REPO = Path(__file__).resolve().parents[1]


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
    if any("=" not in v for v in args.variants) or len(args.variants) > 6:
        ap.error("expected 1 to 6 NAME=OVERRIDES")
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

    def train(job: tuple[str, str, int]) -> int:
        name, overrides, fold = job
        cmd = [sys.executable, "run.py", *base_flags(args), *shlex.split(overrides)]
        cmd += [f"--config.data.cv_fold={fold}", f"--workdir={runs / name}"]
        code = run_logged(cmd, runs / f"{name}_fold{fold}.log")
        sys.stdout.write(f"{name} fold {fold}: exit {code} at {time.time() - t0:.0f} s\n")
        sys.stdout.flush()
        return code

    def finish(name: str, overrides: str) -> None:
        """The variant's cv_report (run.py skips its finished folds), one line in cv.jsonl and
        its files in OUT/<NAME>.tgz, as soon as its last fold is done."""
        cmd = [sys.executable, "run.py", *base_flags(args), *shlex.split(overrides)]
        code = run_logged(cmd + [f"--workdir={runs / name}"], runs / f"{name}_report.log")
        report_path = runs / name / "cv_report.json"
        fresh = report_path.exists() and report_path.stat().st_mtime >= t0
        if code or not fresh:
            row = {"run": name, "error": f"no cv_report (exit {code}): see {name}_report.log"}
        else:
            cv = json.loads(report_path.read_text())
            row = {"run": name, "overrides": overrides, "patients": cv["patients"]}
            for v, e in cv["variants"].items():
                row[v] = {k: e[k] for k in ("mean", "median", "ci95", "missed", "per_fold")}
        with lock, (out / "cv.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        with tarfile.open(out / f"{name}.tgz", "w:gz") as tar:
            wanted = ["cv_report.json", "cv_report.md", "cv_patients.csv"] + [
                f"fold_{k}/{f}"
                for k in range(args.folds)
                for f in ("metrics.jsonl", "report.json", "report_patients.csv")
            ]
            for rel in wanted:
                if (runs / name / rel).exists():
                    tar.add(runs / name / rel, arcname=f"{name}/{rel}")
            for log in sorted(runs.glob(f"{name}_*.log")):
                tar.add(log, arcname=f"{name}/logs/{log.name}")

    lock = threading.Lock()
    pending = {name: args.folds for name, _ in variants}
    failed: set[str] = set()
    jobs = [(n, o, k) for n, o in variants for k in range(args.folds)]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(train, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            name, overrides, _ = futures[future]
            pending[name] -= 1
            if future.result():
                failed.add(name)
            if pending[name] == 0 and name not in failed:
                finish(name, overrides)
            elif pending[name] == 0:
                row = {"run": name, "error": f"a fold failed: see {name}_fold<k>.log"}
                with (out / "cv.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(f"cross-validation done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
