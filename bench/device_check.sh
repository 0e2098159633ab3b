#!/usr/bin/env bash
# One prepared check for a lent H100/H200 (the `device` tool of this workplace; its README
# gives the limits: <= 64 MiB carried, nothing reachable from the machine, 10 minutes a call).
#
# Prepare here, once (the device image has jax, flax, optax, orbax, numpy, scipy, tifffile,
# matplotlib and absl; it lacks tensorflow-datasets and its pure-Python needs, grain,
# array-record, ml-collections and tensorboardX):
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl tensorflow-datasets==4.9.10 grain==0.2.18 array-record==0.8.6 \
#         ml-collections==1.1.0 tensorboardX==2.6.5 dm-tree==0.1.10 simple-parsing==0.1.9 \
#         docstring-parser tensorflow-metadata==1.21.0 googleapis-common-protos termcolor toml \
#         immutabledict portpicker importlib-resources etils==1.15.0 protobuf==7.36.2
#     python3 -m pip wheel --no-deps -w .whl promise==2.3     # sdist only on PyPI
#
# then run it there with `.whl` carried:  bash bench/device_check.sh   (about 7 minutes)
#
# It prints JSON lines (and writes them to $OUT/device_check.jsonl): the device and library
# versions; the train step's time, images/s and MFU in bfloat16 and float32 at the notebook's
# size (batch 32, 256x256, base 64); a timed 20-epoch run of configs/gpu.py (bf16, device
# cache, async checkpoints) on a synthetic phantom of the notebook's size made on the device
# (3,120 training slices an epoch), with images/s per epoch, the host overhead per step and the
# extrapolated 100-epoch wall time; 3 epochs of the same with the grain input pipeline; and
# (not with --smoke) bench/profile_gpu.py's split of the bf16 step's kernel time by class.
# `bash bench/device_check.sh --smoke` runs it at tiny sizes on any machine (CI does).
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
failed=""
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint as ocp, tensorflow_datasets as tfds, grain
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'tfds', tfds.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

timeout 420 python3 bench/device_check.py --out="$OUT" "$@" 2>"$OUT/device_check.log" \
  || failed="$failed device_check.py"
tail -5 "$OUT/device_check.log"
if [[ " $* " != *" --smoke "* ]]; then  # where the bf16 step's time goes, by kind of kernel
  timeout 200 python3 bench/profile_gpu.py --out="$OUT/profile" 2>"$OUT/profile.log" \
    | tee -a "$OUT/device_check.jsonl" || { failed="$failed profile_gpu.py"; tail -5 "$OUT/profile.log"; }
fi
if [ -n "$failed" ]; then echo "device_check FAILED:$failed"; exit 1; fi
echo "device_check done"
