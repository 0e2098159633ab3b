"""Training throughput of `configs/cpu.py` on a CPU split into 1, 2, 4 ... JAX devices
(`config.host_devices`), through the real command line: `run.py` in a fresh process per
count, rounds alternating the counts so that a machine-wide slowdown hits all of them.

    python bench/host_devices.py --counts=1,2,4 --steps=120
    python bench/host_devices.py --manual-dir=/path/to/kaggle_3m     # real slices, fold 0

Without --manual-dir it trains on the synthetic phantom at the recipe's size (128x128, batch
16, base 16): the step's cost does not depend on what the images show. Images/s is measured
from the log's timestamps between step 40 (compilation and warm-up behind) and --steps,
inside the first epoch. Prints a Markdown table; --write appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

import common

STEP_LINE = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] step +(\d+)/\d+ ")
FIRST_STEP = 40  # the window starts here: compilation and the first epoch's warm-up behind


def step_times(lines: list[str]) -> dict[int, float]:
    """step -> seconds since midnight, from the training log's step lines (absl format)."""
    times = {}
    for line in lines:
        m = STEP_LINE.match(line)
        if m:
            h, mnt, sec, step = m.groups()
            times[int(step)] = int(h) * 3600 + int(mnt) * 60 + float(sec)
    return times


def images_per_second(times: dict[int, float], first: int, last: int, batch: int) -> float:
    """Throughput between two logged steps (a window across midnight wraps around)."""
    seconds = (times[last] - times[first]) % 86400
    return (last - first) * batch / seconds


def measure(count: int, steps: int, args: argparse.Namespace, scratch: str) -> float:
    workdir = tempfile.mkdtemp(dir=scratch)
    cmd = [
        sys.executable,
        str(common.REPO / "run.py"),
        "--config=configs/cpu.py",
        f"--workdir={workdir}",
        f"--config.host_devices={count}",
        "--config.log_every_steps=10",
        f"--config.data.data_dir={args.data_dir or os.path.join(scratch, 'tfds')}",
    ]
    if args.manual_dir:
        cmd += [f"--config.data.manual_dir={args.manual_dir}", "--config.data.cv_fold=0"]
    else:  # enough phantom slices that the window stays inside the first epoch
        cmd += [
            "--config.data.phantom=True",
            "--config.data.phantom_patients=100",
            "--config.data.cv_folds=0",
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.Popen(
        cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if steps in step_times([line]):
            break
    proc.terminate()
    proc.wait()
    times = step_times(lines)
    if steps not in times or FIRST_STEP not in times:
        sys.exit(
            f"host_devices={count}: the run ended before step {steps}:\n{''.join(lines[-20:])}"
        )
    if "epoch 2" in "".join(line for line in lines if STEP_LINE.match(line)):
        sys.exit(f"host_devices={count}: the window crossed an epoch's end; lower --steps")
    return images_per_second(times, FIRST_STEP, steps, batch=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--manual-dir", default="", help="real data (default: the phantom)")
    parser.add_argument("--data-dir", default="", help="prepared data (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if args.steps % 10 or args.steps <= FIRST_STEP:
        parser.error(f"--steps must be a multiple of 10 above {FIRST_STEP}")
    rates: dict[int, list[float]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for count in counts:
                rates[count].append(measure(count, args.steps, args, scratch))
                print(f"round {r + 1}: host_devices={count}: {rates[count][-1]:.1f} images/s")
    base = statistics.median(rates[counts[0]])
    data = args.manual_dir or "phantom"
    lines = [
        f"`python bench/host_devices.py --counts={args.counts} --steps={args.steps} "
        f"--rounds={args.rounds}` ({data}; {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; steps {FIRST_STEP}-{args.steps}, median of rounds)",
        "",
        f"| host_devices | images/s | x {counts[0]} device(s) |",
        "| --- | --- | --- |",
    ]
    for count in counts:
        rate = statistics.median(rates[count])
        lines.append(f"| {count} | {rate:.1f} | {rate / base:.2f} |")
    common.emit(lines, args.write)


if __name__ == "__main__":
    main()
