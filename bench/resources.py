"""Throughput (images/s) and peak memory of train, evaluate and predict, each as the user runs
it (`run.py` under `/usr/bin/time -v`), plus the model's own inference rate in-process.

    python bench/resources.py --workdir=runs/cpu --manual-dir=PATH [--config=configs/cpu.py]

`--workdir` is a finished training run (evaluate and predict read its best checkpoint); the
train row trains `--train-epochs` epochs of the same config into a scratch folder. Images/s of
the commands count every image they read over the whole wall time, JAX start-up and
compilation included (what a user waits for); the in-process rows time `lggunet.predict`
after a warm-up call (what a long-running service would see). Prints a Markdown table;
--write appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], log: Path) -> dict:
    """Runs `cmd` under /usr/bin/time -v; (wall s, peak RSS MiB, its stderr text)."""
    full = ["/usr/bin/time", "-v", *cmd]
    with log.open("w") as f:
        rc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = 60 * seconds + float(part)
    return {"wall_s": seconds, "peak_rss_mib": rss_kb / 1024, "log": text}


def in_process_rate(workdir: str, tta: bool, batch: int, repeats: int) -> float:
    """images/s of lggunet.predict on 256x256x3 slices after one warm-up call."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    import lggunet

    model = lggunet.load_model(workdir, tta=tta)
    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    lggunet.predict(images, model)
    t0 = time.perf_counter()
    for _ in range(repeats):
        lggunet.predict(images, model)
    return batch * repeats / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished training run")
    ap.add_argument("--manual-dir", required=True, help="kaggle_3m folder (or zip)")
    ap.add_argument("--config", default="configs/cpu.py")
    ap.add_argument("--train-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32, help="in-process predict batch")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    python = sys.executable
    workdir = str(Path(args.workdir).resolve())
    manual = str(Path(args.manual_dir).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = timed(
            [python, "run.py", f"--config={args.config}", f"--config.data.manual_dir={manual}",
             f"--config.num_epochs={args.train_epochs}", "--config.data.cv_folds=0",
             f"--workdir={tmp / 'train'}"],
            tmp / "train.log",
        )  # fmt: skip
        rates = re.findall(r"\| ([\d.]+) images/s", train["log"])
        slices = re.search(r"train (\d+) slices", train["log"])
        rows.append(
            ("train", f"{args.train_epochs} epoch(s) of {slices.group(1)} slices",
             train["wall_s"], f"{float(rates[-1]):.1f} (training steps)", train["peak_rss_mib"])
        )  # fmt: skip

        evaluate = timed(
            [python, "run.py", f"--config={args.config}", f"--config.data.manual_dir={manual}",
             "--mode=evaluate", f"--workdir={workdir}"],
            tmp / "evaluate.log",
        )  # fmt: skip
        report = json.loads((Path(workdir) / "report.json").read_text())
        n = sum(s["num_slices"] for s in report["splits"].values())
        tta = " + TTA" if report["settings"].get("tta") else ""
        rows.append(
            ("evaluate", f"{n} slices{tta}", evaluate["wall_s"],
             f"{n / evaluate['wall_s']:.1f}", evaluate["peak_rss_mib"])
        )  # fmt: skip

        predict = timed(
            [python, "run.py", f"--config={args.config}", "--mode=predict",
             f"--workdir={workdir}", f"--input={manual}", f"--output={tmp / 'masks'}"],
            tmp / "predict.log",
        )  # fmt: skip
        n = len(list((tmp / "masks").rglob("*_mask.tif")))
        rows.append(
            ("predict", f"{n} slices -> masks + overlays", predict["wall_s"],
             f"{n / predict['wall_s']:.1f}", predict["peak_rss_mib"])
        )  # fmt: skip
    for tta in (False, True):
        rate = in_process_rate(workdir, tta, args.batch, repeats=3)
        what = f"lggunet.predict, batch {args.batch}" + (", TTA (+ flipped view)" if tta else "")
        rows.append(("in-process", what, None, f"{rate:.1f}", None))

    lines = [
        f"### Train, evaluate, predict: throughput and peak memory ({datetime.date.today()}, "
        f"{os.cpu_count()} cores)",
        "",
        f"`python bench/resources.py --workdir=RUN --manual-dir=PATH --config={args.config}`",
        "",
        "| job | work | wall s | images/s | peak RSS MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job, work, wall, rate, rss in rows:
        wall = f"{wall:.1f}" if wall is not None else ""
        rss = f"{rss:.0f}" if rss is not None else ""
        lines.append(f"| {job} | {work} | {wall} | {rate} | {rss} |")
    common.emit(lines, args.write)


if __name__ == "__main__":
    main()
