"""Loader throughput beside the train step's consumption rate (prints a table; not a test).

    python bench/loader.py                       # real data from $LGG_DATA_DIR or ../shared
    python bench/loader.py --phantom             # the synthetic phantom instead

Measures, on this machine:
  * grain loader images/s (read + PNG decode + batch) with 0, 1 and 2 worker processes;
  * the same followed by on-device augmentation, and the device cache's gather rate;
  * the jitted train step's images/s for configs/demo.py and configs/unet.py (batch 8 here);
  * augmentation's cost as a share of a train step;
  * from the measured per-image loader cost, the grain workers an H100 training
    configs/unet.py at ~700 images/s would need.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from lggunet import augment, dataset, input_pipeline, steps, train  # noqa: E402
from lggunet.configs import demo, unet  # noqa: E402

H100_IMAGES_PER_S = 700.0


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def loader_rate(source, batch: int, num_batches: int, workers: int, aug=None) -> float:
    plan = input_pipeline.epoch_plan(len(source), batch, shuffle=True, seed=0, epoch=0)
    n = min(num_batches, len(plan))
    plan = input_pipeline.EpochPlan(plan.indices[:n], plan.valid[:n])
    aug_fn = None
    if aug is not None:
        params = augment.PRESETS["notebook"]
        aug_fn = jax.jit(
            lambda k, b: augment.augment_batch(
                k, b["image"].astype(np.float32) / 255, b["mask"].astype(np.float32), params
            )
        )
    it = input_pipeline.iterate(source, plan, num_threads=4, num_workers=workers)
    first = next(it)  # start-up (worker spawn) is not throughput
    if aug_fn is not None:
        jax.block_until_ready(aug_fn(jax.random.key(0), input_pipeline.device_batch(first)))
    t0 = time.perf_counter()
    count = 0
    for i, b in enumerate(it):
        if aug_fn is not None:
            jax.block_until_ready(aug_fn(jax.random.key(i), input_pipeline.device_batch(b)))
        count += len(b["image"])
    return count / (time.perf_counter() - t0)


def cache_rate(source, batch: int, num_batches: int) -> float:
    cache = input_pipeline.DeviceCache(source)
    plan = input_pipeline.epoch_plan(len(source), batch, shuffle=True, seed=0, epoch=0)
    n = min(num_batches, len(plan))
    head = input_pipeline.EpochPlan(plan.indices[:n], plan.valid[:n])

    def run():
        for b in cache.iterate(head):
            jax.block_until_ready(b["image"])

    return n * batch / timed(run, 2)


def step_rate(config, batch: int, repeats: int) -> tuple[float, float]:
    """(train step images/s, augmentation seconds as a share of the step)."""
    config.batch_size = batch
    size = config.data.image_size
    state = steps.create_train_state(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8),
        "mask": (rng.random((batch, 256, 256, 1)) > 0.97).astype(np.uint8),
        "valid": np.ones(batch, bool),
        "volume_mean": np.zeros((batch, 3), np.float32),
        "volume_std": np.ones((batch, 3), np.float32),
    }
    device = jax.device_put(host)
    options = steps.StepOptions.from_config(config)
    step = jax.jit(train.train_step, static_argnames="options")
    holder = {"state": state}

    def one():
        holder["state"], out = step(holder["state"], device, jax.random.key(1), options=options)
        jax.block_until_ready(out)

    step_s = timed(one, repeats)
    params = options.augment
    images = jax.device_put(np.zeros((batch, size, size, 3), np.float32))
    masks = jax.device_put(np.zeros((batch, size, size, 1), np.float32))
    aug = jax.jit(lambda k: augment.augment_batch(k, images, masks, params))
    aug_s = timed(lambda: jax.block_until_ready(aug(jax.random.key(2))), repeats)
    return batch / step_s, aug_s / step_s


def main() -> None:
    flags.FLAGS.mark_as_parsed()
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantom", action="store_true")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--unet-steps", type=int, default=3)
    args = ap.parse_args()

    config = unet.get_config()
    real = Path(os.environ.get("LGG_DATA_DIR", REPO.parent / "shared/data/lgg/kaggle_3m"))
    tmp = tempfile.mkdtemp(prefix="lggunet-bench-")
    config.data.data_dir = tmp
    if args.phantom or not real.is_dir():
        config.data.phantom = True
    else:
        config.data.manual_dir = str(real)
    builder = dataset.prepare(config.data)
    source = builder.as_data_source("train")
    print(f"data: {builder.info.metadata['source']} (train split, {len(source)} slices)")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs\n")

    rows = []
    for workers in (0, 1, 2):
        rows.append((f"grain, {workers} workers", loader_rate(source, 32, args.batches, workers)))
    rows.append(
        ("grain, 0 workers + augmentation", loader_rate(source, 32, args.batches, 0, aug=True))
    )
    rows.append(("device cache (gather)", cache_rate(source, 32, args.batches)))

    demo_rate, demo_aug = step_rate(demo.get_config(), 8, 5)
    unet_rate, unet_aug = step_rate(unet.get_config(), 8, args.unet_steps)

    print(f"{'loader':40s} {'images/s':>10s} {'x demo step':>12s} {'x unet step':>12s}")
    for name, rate in rows:
        print(f"{name:40s} {rate:10.1f} {rate / demo_rate:12.1f} {rate / unet_rate:12.1f}")
    print()
    print(f"{'train step (batch 8)':40s} {'images/s':>10s} {'augment share':>14s}")
    print(f"{'configs/demo.py (64x64, base 8)':40s} {demo_rate:10.1f} {demo_aug:14.2%}")
    print(f"{'configs/unet.py (256x256, base 64)':40s} {unet_rate:10.1f} {unet_aug:14.2%}")
    cores = os.cpu_count() or 1
    core_s = cores / rows[0][1]  # an upper bound: the threads had every core to themselves
    print(
        f"\nH100 estimate: one image costs at most {core_s * 1e3:.2f} ms of one CPU core to "
        f"read, decode and batch ({rows[0][1]:.0f} images/s on {cores} cores), so "
        f"configs/unet.py at ~{H100_IMAGES_PER_S:.0f} images/s needs at most "
        f"{H100_IMAGES_PER_S * core_s:.1f} cores of reader work (grain threads or workers), "
        "or none with the device cache."
    )


if __name__ == "__main__":
    main()
