"""Train-step time, images/s and MFU of configs/unet.py on an accelerator (H100/H200), in
float32 and bfloat16, and the wall time that implies for one epoch of the full data set.

    python bench/gpu.py                      # configs/unet.py: batch 32, 256x256, base 64
    python bench/gpu.py --smoke              # tiny sizes, any machine (checks the script)

The step is lggunet's real train step (augmentation included, as configs/unet.py sets it),
jit-compiled over all local devices, on a synthetic batch held on the device (the input
pipeline is measured by bench/loader.py). The step time is the mean of `--steps` steps run
back to back with one wait at the end, as a training loop runs them; the median of steps each
waited for (`step_ms_synced`) adds the dispatch latency that such a loop overlaps (2.3 ms of
27.5 on an H200). FLOPs are counted from the step's jaxpr: 2 x output
elements x contraction length summed over every convolution and matrix product of the forward
and backward pass (bench/gpu.py's model_flops; XLA's compiled cost analysis gave no usable count
for cuDNN convolutions on an H100); MFU = FLOPs / step time / the chip's dense peak for that
dtype (bf16 tensor cores for bfloat16, TF32 tensor cores for float32: XLA's default precision
for float32 convolutions on NVIDIA GPUs). One epoch = ceil(3143 / batch) steps, the
notebook's training split of the 3,929 slices.

On a lent device run it through bench/device_check.sh, whose header lists the wheels to
carry (the device image lacks tensorflow-datasets, grain, array-record, ml-collections and
tensorboardX). Figures from an H100: BENCHMARKS.md.

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
# (SXM parts; the H200 has the H100's compute and faster memory; PCIe/NVL H100s peak lower, so
# their MFU here is understated).
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


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
                yield v.jaxpr
            elif hasattr(v, "eqns"):  # Jaxpr
                yield v


def model_flops(jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in a jaxpr, nested ones included:
    sum of 2 x output elements x contraction length (for a convolution, kernel elements / output
    features; for dot_general, the contracted lhs dimensions). Elementwise work (BN, ReLU, Adam)
    is not counted, as is usual for MFU. Backend-independent: XLA's compiled cost analysis
    gave no usable count for cuDNN convolutions on an H100. Exact for this U-Net's step (jit,
    custom_jvp, einsum up-sampling; tests/test_bench.py); elsewhere it would count every
    branch of a cond, a while body once, remat's recomputation, and the zeros that lhs
    dilation (transposed convolutions) inserts."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            contraction = math.prod(rhs) / rhs[out_dim]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contraction
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contraction = math.prod(lhs[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contraction
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += times * model_flops(sub)
    return total


def measure(config, steps: int) -> dict:
    """Compiles and times the train step for `config` on a synthetic, device-resident batch."""
    import jax

    from lggunet import parallel
    from lggunet import steps as step_lib

    mesh = parallel.data_mesh()
    state, rng = step_lib.initial_state(config, mesh)
    step = step_lib.compile_steps(config, mesh).train
    size, batch = config.data.image_size, config.batch_size
    batch_arrays = parallel.global_batch(common.synthetic_batch(batch, size), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, rng).compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(jax.make_jaxpr(step)(state, batch_arrays, rng).jaxpr)
    for _ in range(3):  # warm-up
        state, out = compiled(state, batch_arrays, rng)
    jax.block_until_ready((state, out))
    synced = []  # each step waited for: adds the dispatch latency a training loop overlaps
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = compiled(state, batch_arrays, rng)
        jax.block_until_ready((state, out))
        synced.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # back to back, one wait at the end: the device's step time
    for _ in range(steps):
        state, out = compiled(state, batch_arrays, rng)
    jax.block_until_ready((state, out))
    step_s = (time.perf_counter() - t0) / steps
    if not math.isfinite(float(out["loss"])):
        raise RuntimeError(f"loss is {float(out['loss'])} in the benchmark")
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, config.dtype)
    n_dev = jax.device_count()
    return {
        "device": f"{n_dev} x {device.device_kind}",
        "dtype": config.dtype,
        "batch": batch,
        "compile_s": compile_s,
        "step_ms": 1000 * step_s,
        "step_ms_synced": 1000 * statistics.median(synced),
        "images_per_s": batch / step_s,
        "gflop_per_step": flops / 1e9,
        "mfu": flops / step_s / (peak * n_dev) if peak and flops else None,
        "epoch_s": math.ceil(EPOCH_IMAGES / batch) * step_s,
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

    from lggunet.configs import unet

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
