"""Where the CPU train step's time goes: one 3x3 convolution (forward, and forward + both
gradients) at the U-Net's shapes, in XLA (JAX) and, with --peer-python, in PyTorch, to find
which part of the step XLA CPU is slow at. Prints a table; run by hand.

    python bench/conv_layers.py --peer-python=/tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# (height/width, channels in, channels out): the base-16 U-Net's levels, batch 8.
SHAPES = [(256, 3, 16), (256, 16, 16), (128, 32, 32), (64, 64, 64), (32, 128, 128)]
BATCH = 8

TORCH = r"""
import json, statistics, sys, time, torch
batch, size, cin, cout, reps = map(int, sys.argv[1:6])
x = torch.randn(batch, cin, size, size, requires_grad=True).to(memory_format=torch.channels_last)
conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last)
def fwd():
    with torch.no_grad():
        conv(x)
def both():
    conv(x).sum().backward()
out = {}
for name, fn in (("fwd", fwd), ("fwd+bwd", both)):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    out[name] = statistics.median(ts)
print(json.dumps(out))
"""


def jax_times(size, cin, cout, reps):
    import jax

    key = jax.random.key(0)
    x = jax.random.normal(key, (BATCH, size, size, cin))
    w = jax.random.normal(key, (3, 3, cin, cout)) * 0.1

    def conv(w, x):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    fwd = jax.jit(conv)
    both = jax.jit(jax.grad(lambda w, x: conv(w, x).sum(), argnums=(0, 1)))
    out = {}
    for name, fn in (("fwd", fwd), ("fwd+bwd", both)):
        jax.block_until_ready(fn(w, x))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(w, x))
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default="")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(
        "| HxW | cin -> cout | GFLOP fwd | XLA fwd ms | torch fwd ms | XLA fwd+bwd ms "
        "| torch fwd+bwd ms | XLA/torch fwd+bwd |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, cin, cout in SHAPES:
        flops = 2 * BATCH * size * size * 9 * cin * cout / 1e9
        j = jax_times(size, cin, cout, args.reps)
        t = {"fwd": float("nan"), "fwd+bwd": float("nan")}
        if args.peer_python:
            res = subprocess.run(
                [args.peer_python, "-c", TORCH, *map(str, (BATCH, size, cin, cout, args.reps))],
                capture_output=True,
                text=True,
            )
            t = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"| {size} | {cin} -> {cout} | {flops:.2f} | {j['fwd'] * 1e3:.1f} | "
            f"{t['fwd'] * 1e3:.1f} | {j['fwd+bwd'] * 1e3:.1f} | {t['fwd+bwd'] * 1e3:.1f} | "
            f"{j['fwd+bwd'] / t['fwd+bwd']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
