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
# then run it there with `.whl` carried:  bash bench/device_check.sh   (about 5 minutes)
#
# It prints, and writes under $OUT: the device and library versions; bench/gpu.py's train-step
# time, images/s and MFU in float32 and bfloat16 at the notebook's size (batch 32, 256x256,
# base 64); and a real run of run.py with configs/unet.py (float32, as shipped) on a synthetic
# phantom data set of 1,600 256x256 slices, whose step log gives images/s of the whole loop
# (input pipeline, host syncs, checkpoints and evaluation included).
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

timeout 240 python3 bench/gpu.py --steps=30 2>&1 | tee "$OUT/gpu.txt" || failed="$failed gpu.py"

rm -rf /tmp/run_unet  # a rerun on a warm machine would resume the finished run, not time one
timeout 300 python3 run.py --config=configs/unet.py --config.data.phantom=True \
  --config.data.phantom_patients=40 --config.data.phantom_slices=40 \
  --config.data.data_dir=/tmp/tfds --config.num_epochs=4 --workdir=/tmp/run_unet \
  > "$OUT/train_unet_phantom.log" 2>&1 || failed="$failed run.py"
grep -E "step |epoch|Dice|images/s|Error|error" "$OUT/train_unet_phantom.log" | tail -40
cp /tmp/run_unet/metrics.jsonl "$OUT/" 2>/dev/null || true
if [ -n "$failed" ]; then echo "device_check FAILED:$failed"; exit 1; fi
echo "device_check done"
