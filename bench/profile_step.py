"""Where the CPU train step's time goes, by kind of XLA operation, from a profiler trace of
the real compiled step (batch 8, 256x256x3, configs/unet.py with the given base width).

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python bench/profile_step.py --base=16

Every executed HLO instruction (a "thunk") is put in one class: the convolutions by what they
compute (forward or input gradient: a 3x3 window; weight gradient: a window the size of the
image) and by which library runs them (YNNPACK custom fusions, or XLA's own Eigen path),
layout copies (transposes that feed the weight gradients), and everything else (BatchNorm,
ReLU, pooling, loss and Adam, as XLA loop fusions). Prints each class's share of CPU time
(summed over XLA's worker threads) and GFLOP/s of the convolutions.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]


def classify(hlo: str) -> dict[str, str]:
    """instruction name -> class, from the compiled module's text."""
    computations = {}
    for m in re.finditer(r"^(%[\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M):
        computations[m.group(1)] = m.group(2)

    def conv_kind(line: str) -> str:
        window = re.search(r"window=\{size=(\d+)x(\d+)", line)
        big = window and int(window.group(1)) > 3
        return "weight gradient" if big else "forward / input gradient"

    classes = {}
    entry = hlo[hlo.index("ENTRY") :]
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            continue
        name, op = m.groups()
        if op == "convolution":
            classes[name] = f"conv {conv_kind(line)}, XLA Eigen"
        elif op == "fusion" and "ynn_fusion" in name:
            body = computations.get(re.search(r"calls=(%[\w.\-]+)", line).group(1), "")
            conv = [x for x in body.splitlines() if " convolution(" in x]
            if conv:
                classes[name] = f"conv {conv_kind(conv[0])}, YNNPACK"
            elif " dot(" in body:
                classes[name] = "dot, YNNPACK"
            else:
                classes[name] = "other YNNPACK fusion"
        elif op == "copy" or "transpose" in name or name.startswith("copy"):
            classes[name] = "layout copies / transposes"
        elif op in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
            continue
        else:
            classes[name] = "elementwise and reductions (BN, ReLU, pool, loss, Adam)"
    return classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (per-op trace events)")
    sys.path.insert(0, str(REPO))
    import jax
    from jax.profiler import ProfileData

    from lggunet import parallel, steps
    from lggunet.configs import unet

    config = unet.get_config()
    config.model.features, config.batch_size, config.augment.enabled = args.base, 8, False
    mesh = parallel.data_mesh()
    state, rng = steps.initial_state(config, mesh)
    batch = parallel.global_batch(common.synthetic_batch(8, 256), mesh)
    compiled = steps.compile_steps(config, mesh).train.lower(state, batch, rng).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    classes = classify(compiled.as_text())
    for _ in range(2):
        state, out = compiled(state, batch, rng)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            state, out = compiled(state, batch, rng)
            jax.block_until_ready(out)
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        profile = ProfileData.from_file(str(trace))
    busy = collections.Counter()
    wall_ns = 0
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "ThunkExecutor::Execute (wait for completion)":
                    wall_ns += event.duration_ns
                op = classes.get(event.name)
                if op:
                    busy[op] += event.duration_ns
    total = sum(busy.values())
    step_s = wall_ns / args.steps / 1e9
    print(
        f"base {args.base}: step {step_s:.2f} s wall, {flops / 1e9:.0f} GFLOP "
        f"({flops / 1e9 / step_s:.0f} GFLOP/s overall); CPU time by class:\n"
    )
    print("| class | share of op CPU time | ms CPU per step |")
    print("| --- | --- | --- |")
    for op, ns in busy.most_common():
        print(f"| {op} | {100 * ns / total:.1f}% | {ns / args.steps / 1e6:.0f} |")


if __name__ == "__main__":
    main()
