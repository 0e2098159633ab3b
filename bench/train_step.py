"""Train-step throughput of lggunet's U-Net against the same network in PyTorch and Keras/TF
(`../shared/peers/peer_unet_bench.py`, run in its own venv), alternating in one run.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 tensorflow-cpu numpy
    python bench/train_step.py --peer-python=/tmp/peers/bin/python --bases=16,32 --steps=8
    python bench/train_step.py --peer-python=/tmp/peers/bin/python --bases=64 --steps=3 \
        --xla-variants=default,xnn,onednn

Batch 8 of 256x256x3 float32 images, Dice loss, Adam 1e-4, BatchNorm, depth 4, as the peers.
Every measurement runs in a fresh process (XLA flags are read at start-up); rounds alternate
the frameworks so that a machine-wide slowdown hits all of them. Prints a Markdown table with
median images/s and the ratio lggunet / fastest peer; --write appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO.parent / "shared" / "peers" / "peer_unet_bench.py"

# XLA CPU variants to try for lggunet (flags exist in jaxlib 0.10; unknown ones fail loudly).
XLA_VARIANTS = {
    "default": "",
    "xnn": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_experimental_onednn_custom_call=true",
    "no-eigen-mt": "--xla_cpu_multi_thread_eigen=false",
    # YNNPACK (which already runs most convolutions) also for elementwise ops and reductions.
    "ynn-eltwise": "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce",
    "onednn-fusions": "--xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "fast-math": "--xla_cpu_enable_fast_math=true",
}


def lggunet_worker(base: int, batch: int, steps: int) -> dict:
    """Runs in the child: jit the real train step (no augmentation) and time it."""
    sys.path.insert(0, str(REPO))
    import jax

    from lggunet import parallel
    from lggunet import steps as step_lib
    from lggunet.configs import unet

    config = unet.get_config()
    config.model.features = base
    config.batch_size = batch
    config.augment.enabled = False
    mesh = parallel.data_mesh()
    state, rng = step_lib.initial_state(config, mesh)
    steps_fn = step_lib.compile_steps(config, mesh)
    batch_arrays = parallel.global_batch(common.synthetic_batch(batch, 256), mesh)
    t0 = time.perf_counter()
    state, out = steps_fn.train(state, batch_arrays, rng)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = steps_fn.train(state, batch_arrays, rng)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "framework": f"lggunet (jax {jax.__version__})",
        "params": int(params),
        "first_step_s": round(first, 3),
        "median_step_s": round(median, 4),
        "images_per_s": round(batch / median, 3),
    }


def run_lggunet(base, batch, steps, variant) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_VARIANTS[variant]}
    cmd = [sys.executable, __file__, "--worker", f"--bases={base}", f"--batch={batch}"]
    cmd.append(f"--steps={steps}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"framework": f"lggunet [{variant}]", "error": out.stderr.strip()[-300:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["framework"] += f" [{variant}]"
    return result


def run_peer(python, framework, base, batch, steps, extra=()) -> dict:
    cmd = [python, str(PEER_SCRIPT), "--framework", framework, "--batch", str(batch)]
    cmd += ["--base", str(base), "--steps", str(steps), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"framework": framework, "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default="", help="python of the peers' venv")
    ap.add_argument("--bases", default="16,32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--xla-variants", default="default")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(lggunet_worker(int(args.bases), args.batch, args.steps)))
        return

    variants = args.xla_variants.split(",")
    rows = []
    for base in (int(b) for b in args.bases.split(",")):
        results: dict[str, list[dict]] = {}
        plan = [(f"lggunet [{v}]", "lggunet", v) for v in variants]
        if args.peer_python:
            plan += [
                ("torch", "torch", ()),
                ("torch channels-last", "torch", ("--channels-last",)),
                ("keras", "keras", ()),
            ]
        for _ in range(args.rounds):
            for name, kind, extra in plan:
                if kind == "lggunet":
                    result = run_lggunet(base, args.batch, args.steps, extra)
                else:
                    result = run_peer(args.peer_python, kind, base, args.batch, args.steps, extra)
                results.setdefault(name, []).append(result)
                print(f"base {base} {name}: {result}", flush=True)
        best_peer = max(
            (
                statistics.median(r["images_per_s"] for r in rs)
                for name, rs in results.items()
                if not name.startswith("lggunet") and all("error" not in r for r in rs)
            ),
            default=None,
        )
        for name, rs in results.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                rows.append((base, name, "error", "", "", rs[0]["error"][:80]))
                continue
            ips = statistics.median(r["images_per_s"] for r in ok)
            ratio = f"{ips / best_peer:.2f}" if best_peer and name.startswith("lggunet") else ""
            label = (
                ok[0]["framework"]
                if name.startswith("lggunet")
                else f"{name} ({ok[0]['framework']})"
            )
            rows.append(
                (
                    base,
                    label,
                    f"{ips:.2f}",
                    f"{statistics.median(r['first_step_s'] for r in ok):.1f}",
                    ratio,
                    "",
                )
            )
    lines = [
        f"### Train step, CPU, batch {args.batch}, 256x256x3 "
        f"({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "",
        f"`python bench/train_step.py --bases={args.bases} --steps={args.steps} "
        f"--rounds={args.rounds} --xla-variants={args.xla_variants} --peer-python=...`",
        "",
        "| base | framework | images/s (median) | first step s | lggunet / fastest peer | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {' | '.join(map(str, r))} |" for r in rows]
    common.emit(lines, args.write)


if __name__ == "__main__":
    main()
