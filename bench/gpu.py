"""Train-step time, images/s and MFU of configs/unet.py on an accelerator (H100/H200), in
float32 and bfloat16, and the wall time that implies for one epoch of the full data set.

    python bench/gpu.py                      # configs/unet.py: batch 32, 256x256, base 64
    python bench/gpu.py --smoke              # tiny sizes, any machine (checks the script)

The step is lggunet's real train step (augmentation included, as configs/unet.py sets it),
jit-compiled over all local devices, on a synthetic batch held on the device (the input
pipeline is measured by bench/loader.py). FLOPs come from XLA's cost analysis of the compiled
step (forward, backward and Adam); MFU = FLOPs / step time / the chip's dense peak for that
dtype (bf16 tensor cores for bfloat16, TF32 tensor cores for float32: XLA's default precision
for float32 convolutions on NVIDIA GPUs). One epoch = ceil(3143 / batch) steps, the
notebook's training split of the 3,929 slices.

On a lent device (see /work/.library/device/README.md; none was lent to the task that wrote
this script, so it has run only with --smoke on a CPU): the device image has jax[cuda], flax,
optax, orbax and tifffile; carry wheels for ml-collections, tensorflow-datasets, grain,
array-record, etils, dm-pix and tensorboardX (pip download, as that README shows), and for the
real-data run a zip of kaggle_3m (the builder reads the Kaggle zip in place), then:

    python bench/gpu.py --write
    python run.py --config=configs/unet.py --config.data.manual_dir=lgg.zip --workdir=$OUT/run

Prints a Markdown table; --write appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 3143  # the notebook's training split of the 3,929 slices

# Dense peak FLOP/s per chip: (bfloat16, float32 via TF32 tensor cores). NVIDIA datasheets
# (SXM parts; the H200 has the H100's compute and faster memory).
PEAKS = {
    "H100": (989.4e12, 494.7e12),
    "H200": (989.4e12, 494.7e12),
    "A100": (312e12, 156e12),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, (bf16, tf32) in PEAKS.items():
        if name in device_kind:
            return bf16 if dtype == "bfloat16" else tf32
    return None


def measure(config, steps: int) -> dict:
    """Compiles and times the train step for `config` on a synthetic, device-resident batch."""
    import jax

    from lggunet import parallel, train

    mesh = parallel.data_mesh()
    state, rng = train.initial_state(config, mesh)
    step = train.compile_steps(config, mesh).train
    size, batch = config.data.image_size, config.batch_size
    batch_arrays = parallel.global_batch(common.synthetic_batch(batch, size), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    for _ in range(3):  # warm-up
        state, out = compiled(state, batch_arrays, rng)
    jax.block_until_ready((state, out))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = compiled(state, batch_arrays, rng)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - t0)
    if not math.isfinite(float(out["loss"])):
        raise RuntimeError(f"loss is {float(out['loss'])} in the benchmark")
    median = statistics.median(times)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, config.dtype)
    n_dev = jax.device_count()
    return {
        "device": f"{n_dev} x {device.device_kind}",
        "dtype": config.dtype,
        "batch": batch,
        "compile_s": compile_s,
        "step_ms": 1000 * median,
        "images_per_s": batch / median,
        "gflop_per_step": flops / 1e9,
        "mfu": flops / median / (peak * n_dev) if peak and flops else None,
        "epoch_s": math.ceil(EPOCH_IMAGES / batch) * median,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    ap.add_argument("--smoke", action="store_true", help="64x64, base 8, batch 4, 2 steps")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import jax

    from configs import unet

    rows = []
    for dtype in args.dtypes.split(","):
        config = unet.get_config()
        config.dtype = dtype
        if args.batch:
            config.batch_size = args.batch
        steps = args.steps
        if args.smoke:
            config.data.image_size, config.model.features, config.batch_size = 64, 8, 4
            steps = 2
        result = measure(config, steps)
        print(result, flush=True)
        rows.append(result)

    mfu = lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"  # noqa: E731
    lines = [
        f"### Train step on {rows[0]['device']} ({datetime.date.today()}, jax {jax.__version__})",
        "",
        f"`python bench/gpu.py --dtypes={args.dtypes} --steps={args.steps}"
        + (" --smoke" if args.smoke else "")
        + "`",
        "",
        "| dtype | batch | step ms | images/s | GFLOP/step | MFU | epoch of 3,143 s | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['dtype']} | {r['batch']} | {r['step_ms']:.2f} | {r['images_per_s']:.1f} | "
        f"{r['gflop_per_step']:.1f} | {mfu(r)} | {r['epoch_s']:.1f} | {r['compile_s']:.1f} |"
        for r in rows
    ]
    common.emit(lines, args.write)


if __name__ == "__main__":
    main()
