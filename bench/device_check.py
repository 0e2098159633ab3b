"""The accelerator check, as JSON lines: what the notebook's configuration costs on this device.

    python bench/device_check.py --out=DIR            # on a GPU/TPU, via bench/device_check.sh
    python bench/device_check.py --smoke --out=DIR    # tiny sizes on a CPU (CI runs this)

Each line is one JSON object with a "check" key:

- "versions": jax and the devices.
- "train_step" (float32 and bfloat16): bench/gpu.py's step time, images/s and MFU at the
  notebook's size (batch 32, 256x256, U-Net base 64), on a device-resident batch.
- "run" (configs/gpu.py, device cache): a timed training run of `--epochs` (>= 20) epochs on a
  synthetic phantom data set made here, of the notebook's size (98 patients x 40 slices of
  256x256: 78 training patients, 3,120 slices an epoch, about the notebook's 3,143): images/s
  of each epoch after the first, the host overhead per step (loop step time over the bare step
  time of "train_step" bfloat16, minus 1), the wall time of the run and its extrapolation to
  100 epochs (set-up and final evaluation once, plus 100 x the median epoch), and
  "loop_profile": bench/profile_loop.py's figures of 20 traced steps from step 300 (epoch 4;
  what each step launches, the host time in it, the device's kernel and idle time per step),
  and by epoch the full garbage collections that struck on their own and their milliseconds
  (lggunet.host_gc; the first epoch holds the compilations).
- "run_grain": the same with the grain input pipeline instead of the device cache, 3 epochs.

Never a figure that was not measured: a check that fails prints {"check": ..., "error": ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit(record: dict, out: Path) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "device_check.jsonl").open("a") as f:
        f.write(line + "\n")
    return record


def shrink(config, smoke: bool):
    """The tiny sizes of --smoke (a CPU in CI): 32x32, base 4, depth 2, batch 8."""
    if smoke:
        config.data.image_size, config.model.features, config.model.depth = 32, 4, 2
        config.batch_size, config.eval_batch_size = 8, 16
        config.compilation_cache_dir = ""
    return config


def train_step(dtype: str, smoke: bool) -> dict:
    import gpu as step_bench  # bench/gpu.py

    from lggunet.configs import unet

    config = unet.get_config()
    config.dtype = dtype
    return {"check": "train_step", **step_bench.measure(shrink(config, smoke), 2 if smoke else 30)}


def timed_run(args, name: str, device_cache: bool, epochs: int, step_ms: float | None) -> dict:
    """configs/gpu.py on the phantom for `epochs` epochs; per-epoch rates from metrics.jsonl."""
    from lggunet import train
    from lggunet.configs import gpu

    config = shrink(gpu.get_config(), args.smoke)
    config.data.phantom = True
    config.data.phantom_patients, config.data.phantom_slices = args.patients, args.slices
    config.data.data_dir = str(args.out / "tfds")
    config.data.device_cache = device_cache
    config.num_epochs = epochs
    if device_cache:  # trace a window of steady-state steps (bench/profile_loop.py)
        config.profile.first_step, config.profile.steps = (3, 3) if args.smoke else (300, 20)
    workdir = args.out / name
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints there; stdout is JSON lines
        train.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["epoch_seconds"] for r in records]
    rates = [r["images_per_s"] for r in records[1:]]  # the first epoch compiles
    steps_per_epoch = records[0]["step"]
    batch = config.batch_size
    loop_step_ms = 1000 * batch / statistics.median(rates) if rates else None  # training only
    once = wall - sum(seconds)  # set-up, data preparation, final evaluation
    return {
        "check": name,
        "config": "configs/gpu.py" + (" (smoke sizes)" if args.smoke else ""),
        "device_cache": device_cache,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "images_per_s_median": statistics.median(rates) if rates else None,
        "images_per_s_by_epoch": [round(r, 1) for r in rates],
        "gc_full_collections_by_epoch": [r.get("gc_full_collections") for r in records],
        "gc_full_ms_by_epoch": [round(r.get("gc_full_ms", 0.0), 1) for r in records],
        "epoch_s_median": statistics.median(seconds[1:]) if rates else None,
        "loop_step_ms": loop_step_ms,
        "bare_step_ms": step_ms,
        "host_overhead": loop_step_ms / step_ms - 1 if loop_step_ms and step_ms else None,
        "wall_s": wall,
        "once_s": once,
        "extrapolated_100_epochs_s": once + 100 * statistics.median(seconds[1:]) if rates else None,
        "final_test_volume_dice": json.loads((workdir / "final_metrics.json").read_text())
        .get("test", {})
        .get("volume_dice"),
        "loop_profile": loop_profile(workdir) if config.profile.first_step else None,
    }


def loop_profile(workdir: Path) -> dict:
    """bench/profile_loop.py's figures of the run's traced steps."""
    import profile_loop

    return profile_loop.loop_profile(profile_loop.find_trace(workdir))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any machine")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patients", type=int, default=98)
    ap.add_argument("--slices", type=int, default=40)
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.patients, args.slices = 2, 6, 4
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    import jax

    emit(
        {
            "check": "versions",
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
        },
        args.out,
    )
    failed, bf16_ms = [], None
    checks = [
        ("train_step bfloat16", lambda: train_step("bfloat16", args.smoke)),
        ("train_step float32", lambda: train_step("float32", args.smoke)),
        ("run", lambda: timed_run(args, "run", True, args.epochs, bf16_ms)),
        ("run_grain", lambda: timed_run(args, "run_grain", False, min(3, args.epochs), bf16_ms)),
    ]
    for name, check in checks:
        try:
            record = emit(check(), args.out)
        except Exception as e:  # report it and go on with the other checks
            failed.append(name)
            emit({"check": name, "error": f"{type(e).__name__}: {e}"}, args.out)
            traceback.print_exc()
            continue
        if name == "train_step bfloat16":
            bf16_ms = record["step_ms"]
    emit({"check": "done", "failed": failed}, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
