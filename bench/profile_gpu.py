"""Where an accelerator's train-step time goes, by kind of work, from a profiler trace of the
real compiled step (configs/unet.py at the notebook's size: batch 32, 256x256x3, base 64).

    python bench/profile_gpu.py --dtype=bfloat16 --out=DIR      # on a GPU (bench/device_check.sh)
    python bench/profile_gpu.py --smoke --out=DIR               # tiny sizes, any machine

Every kernel on the device's streams is charged to the HLO instruction that launched it (the
trace's `hlo_op`), and each instruction is put in one class from the compiled module's text:
cuDNN convolutions by direction (forward, input gradient, weight gradient), matrix products,
reduction fusions (BatchNorm statistics and their gradients, the loss), elementwise fusions
(BatchNorm apply, ReLU, pooling, concatenation, Adam), copies and transposes, and the rest.
Prints one JSON line with each class's share of kernel time and ms per step, the busy fraction
of the step (kernel time / wall time), the top instructions, the step timed with
`model.gpu_layers="off"` (the CPU's layer forms, to compare) and without BatchNorm (the
model's `batch_norm=False`, a diagnostic) to show what normalisation costs, and with the
up-sampling as `lax.conv_transpose` (the cuDNN kernel; the model's einsum form was chosen for
the CPU) to see whether the GPU should use it. Writes the
compiled HLO text and a per-instruction table (CSV) to --out for reading afterwards.
XLA launches most fusions as CUDA graphs ("command buffers"), which the trace charges to the
graph; run with XLA_FLAGS=--xla_gpu_enable_command_buffer= to split them by instruction.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import common
import gpu

REPO = Path(__file__).resolve().parents[1]

_CONV_TARGETS = {
    "__cudnn$convForward": "conv forward",
    "__cudnn$convBiasActivationForward": "conv forward",
    "__cudnn$convBackwardInput": "conv input gradient",
    "__cudnn$convBackwardFilter": "conv weight gradient",
}


def classify(hlo: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (class, result shape) for every instruction of the compiled module."""
    bodies = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*?\{\n(.*?)\n\}", hlo, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    classes = {}
    pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?|\(.*?\)) ([\w\-]+)\("
    for line in hlo.splitlines():
        m = re.match(pattern, line)
        if not m:
            continue
        name, shape, op = m.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = re.search(r"kind=(k\w+)", line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called else ""
        if op == "custom-call" and target and target.group(1) in _CONV_TARGETS:
            cls = _CONV_TARGETS[target.group(1)]
        elif op == "convolution" or " convolution(" in body:
            cls = "conv (XLA or fused)"
        elif (
            op == "dot"
            or " dot(" in body
            or "gemm" in name
            or (target and re.search("gemm|blas", target.group(1), re.I))
        ):
            cls = "matrix product"
        elif op == "custom-call":
            cls = f"other (custom-call {target.group(1) if target else '?'})"
        elif op == "fusion" and ((kind and kind.group(1) == "kInput") or " reduce(" in body):
            cls = "reduction fusion (BN statistics and gradients, loss)"
        elif op == "fusion":
            cls = "elementwise fusion (BN apply, ReLU, pool, concat, Adam)"
        elif op in ("copy", "transpose", "copy-start", "copy-done"):
            cls = "copy / transpose"
        else:
            cls = f"other ({op})"
        classes[name] = (cls, shape[:60])
    return classes


def _config(args, batch_norm: bool = True, gpu_layers: str = "auto"):
    from lggunet.configs import unet

    config = unet.get_config()
    config.dtype, config.batch_size = args.dtype, args.batch
    config.model.batch_norm, config.model.gpu_layers = batch_norm, gpu_layers
    if args.smoke:
        config.data.image_size, config.model.features, config.batch_size = 32, 4, 4
    return config


def _compiled(config):
    import jax

    from lggunet import parallel
    from lggunet import steps as step_lib

    mesh = parallel.data_mesh()
    state, rng = step_lib.initial_state(config, mesh)
    step = step_lib.compile_steps(config, mesh).train
    batch = parallel.global_batch(
        common.synthetic_batch(config.batch_size, config.data.image_size), mesh
    )
    compiled = step.lower(state, batch, rng).compile()
    flops = gpu.model_flops(jax.make_jaxpr(step)(state, batch, rng).jaxpr)
    for _ in range(3):
        state, out = compiled(state, batch, rng)
    jax.block_until_ready((state, out))
    return compiled, state, batch, rng, flops


class _ConvTransposeUpsample2x:
    """`models.Upsample2x` as `jax.lax.conv_transpose` (what `nn.ConvTranspose` runs), same
    parameters and result: the candidate GPU form of the up-sampling."""

    def __init__(self):
        import flax.linen as nn
        import jax.numpy as jnp
        from jax import lax

        from lggunet import models

        class Upsample2x(models.Upsample2x):
            @nn.compact
            def __call__(self, x):
                cin = x.shape[-1]
                init = nn.initializers
                kernel = self.param("kernel", init.lecun_normal(), (2, 2, cin, self.features))
                bias = self.param("bias", init.zeros_init(), (self.features,), jnp.float32)
                x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
                dn = ("NHWC", "HWIO", "NHWC")
                return lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=dn) + bias

        self.models, self.original, self.variant = models, models.Upsample2x, Upsample2x

    def __enter__(self):
        self.models.Upsample2x = self.variant

    def __exit__(self, *exc):
        self.models.Upsample2x = self.original


def _time(compiled, state, batch, rng, steps: int):
    """Seconds per step, back to back, and the state to go on with (the step donates it)."""
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, batch, rng)
    jax.block_until_ready((state, out))
    return (time.perf_counter() - t0) / steps, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="steps traced (and 4x as many timed)")
    ap.add_argument("--out", default="/tmp/profile_gpu")
    ap.add_argument("--smoke", action="store_true", help="32x32, base 4, batch 4")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(REPO))
    import jax
    from jax.profiler import ProfileData

    from lggunet import models

    config = _config(args)
    compiled, state, batch, rng, flops = _compiled(config)
    hlo = compiled.as_text()
    (out_dir / "train_step.hlo.txt").write_text(hlo)
    classes = classify(hlo)
    step_s, state = _time(compiled, state, batch, rng, 4 * args.steps)

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = compiled(state, batch, rng)
        jax.block_until_ready((state, out))
        traced_s = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        profile = ProfileData.from_file(str(next(Path(trace_dir).rglob("*.xplane.pb"))))

    per_op = collections.defaultdict(lambda: [0.0, 0, ""])  # ns, kernels, first kernel name
    lines_seen = []
    for plane in profile.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            lines_seen.append(f"{plane.name} | {line.name}")
            derived = ("XLA", "Steps", "Framework", "Source", "Launch", "Task")
            if line.name.startswith(derived):
                continue  # derived lines (XLA Ops, Steps, ...) repeat the streams' kernels
            for event in line.events:
                op = dict(event.stats).get("hlo_op", "?")
                entry = per_op[str(op)]
                entry[0] += event.duration_ns
                entry[1] += 1
                entry[2] = entry[2] or event.name[:80]
    by_class = collections.Counter()
    rows = []
    for op, (ns, n, kernel) in per_op.items():
        if op.startswith("command_buffer"):
            # A CUDA graph of several fusions; XLA_FLAGS=--xla_gpu_enable_command_buffer=
            # launches them one by one, so that each is charged to its own instruction.
            cls, shape = "fusions in command buffers", ""
        else:
            cls, shape = classes.get(op, ("unattributed", ""))
        by_class[cls] += ns
        rows.append((op, cls, shape, ns / args.steps / 1e6, n // args.steps, kernel))
    rows.sort(key=lambda r: -r[3])
    with open(out_dir / "kernels_by_instruction.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "class", "shape", "ms_per_step", "kernels", "kernel"])
        writer.writerows(rows)
    kernel_ns = sum(by_class.values())

    no_bn = _compiled(_config(args, batch_norm=False))
    no_bn_s, _ = _time(*no_bn[:4], 4 * args.steps)
    no_bn_flops = no_bn[4]
    del no_bn
    plain = _compiled(_config(args, gpu_layers="off"))  # the CPU's layer forms, to compare
    plain_s, _ = _time(*plain[:4], 4 * args.steps)
    del plain
    with _ConvTransposeUpsample2x():
        transposed = _compiled(config)
    transposed_s, _ = _time(*transposed[:4], 4 * args.steps)
    device = jax.devices()[0]
    peak = gpu.peak_flops(device.device_kind, config.dtype)
    print(
        json.dumps(
            {
                "check": "profile",
                "device": device.device_kind,
                "dtype": config.dtype,
                "batch": config.batch_size,
                "step_ms": round(1000 * step_s, 2),
                "traced_step_ms": round(1000 * traced_s, 2),
                "kernel_ms_per_step": round(kernel_ns / args.steps / 1e6, 2),
                "busy_fraction": round(kernel_ns / args.steps / 1e9 / traced_s, 3),
                "mfu": flops / step_s / peak if peak else None,
                "ms_by_class": {
                    c: round(ns / args.steps / 1e6, 2) for c, ns in by_class.most_common()
                },
                "share_by_class": {c: round(ns / kernel_ns, 3) for c, ns in by_class.most_common()}
                if kernel_ns
                else {},
                "top": [[r[0], r[1], r[2], round(r[3], 3)] for r in rows[:12]],
                "gpu_layers": models.gpu_layers(config),
                "step_ms_gpu_layers_off": round(1000 * plain_s, 2),
                "step_ms_upsample_conv_transpose": round(1000 * transposed_s, 2),
                "step_ms_without_batchnorm": round(1000 * no_bn_s, 2),
                "mfu_without_batchnorm": no_bn_flops / no_bn_s / peak if peak else None,
                "trace_lines": sorted(set(lines_seen))[:20],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
