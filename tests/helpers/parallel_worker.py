"""Run in a subprocess by tests/test_parallel.py (device count and processes are fixed at
start-up, so each configuration needs its own interpreter).

    python -m tests.helpers.parallel_worker steps OUT.npz [NUM_STEPS]
        a few train steps on fixed synthetic batches (global batch 8) over all devices
    python -m tests.helpers.parallel_worker train OUT.npz WORKDIR DATA_DIR [EPOCHS [KEY=VAL..]]
        train_and_evaluate on the phantom; with $JAX_COORDINATOR_ADDRESS set, as one process
        of a jax.distributed run
Writes the final parameters and BatchNorm statistics (flattened) to OUT.npz.
"""

from __future__ import annotations

import sys

import jax
import numpy as np


def tiny_config():
    from tests.helpers.tiny import tiny_config as shrunk

    config = shrunk()
    config.data.phantom_patients = 6
    config.data.phantom_slices = 10
    config.batch_size = 8
    config.eval_batch_size = 8
    config.learning_rate = 1e-3
    config.log_every_steps = 10
    return config


def flat(state) -> dict[str, np.ndarray]:
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def run_steps(out: str, num_steps: int) -> None:
    from lggunet import parallel
    from lggunet import steps as step_lib

    config = tiny_config()
    mesh = parallel.data_mesh()
    state, rng = step_lib.initial_state(config, mesh)
    init = {f"init{k}": v for k, v in flat(state).items()}
    compiled = step_lib.compile_steps(config, mesh)
    data = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        masks = np.zeros((8, 32, 32, 1), np.uint8)
        masks[:, 8:20, 10:24] = data.integers(0, 2, (8, 1, 1, 1))
        batch = {
            "image": data.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            "mask": masks,
            "valid": np.array([True] * 7 + [False]),
            "volume_mean": np.zeros((8, 3), np.float32),
            "volume_std": np.ones((8, 3), np.float32),
        }
        state, metrics = compiled.train(state, parallel.global_batch(batch, mesh), rng)
        losses.append(float(jax.device_get(metrics["loss"])))
    np.savez(out, losses=np.array(losses), **flat(state), **init)


def run_train(out: str, workdir: str, data_dir: str, epochs: int, overrides: list[str]) -> None:
    from lggunet import parallel, train

    config = tiny_config()
    config.data.data_dir = data_dir
    config.num_epochs = epochs
    for item in overrides:  # top-level integer fields, e.g. batch=2
        key, value = item.split("=")
        config[{"batch": "batch_size"}.get(key, key)] = int(value)
    parallel.initialize(config)
    state, final = train.run_training(config, workdir)
    np.savez(out, step=np.array(int(state.step)), **flat(state))


def run_cache(out: str) -> None:
    """Steady-state train steps fed by the DeviceCache with device-to-device transfers
    disallowed: the cached split must already be on every device of the mesh."""
    from lggunet import input_pipeline, parallel
    from lggunet import steps as step_lib

    config = tiny_config()
    config.batch_size = 8
    mesh = parallel.data_mesh()
    data = np.random.default_rng(0)
    source = [
        {
            "image": data.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "mask": (data.random((32, 32, 1)) > 0.7).astype(np.uint8),
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
            "brain_stats": np.ones((6, 3), np.float32),
            "slice_index": i,
            "tumour_area": 1,
            "patient_id": b"P",
        }
        for i in range(40)
    ]
    cache = input_pipeline.DeviceCache(source, mesh=mesh)
    state, rng = step_lib.initial_state(config, mesh)
    compiled = step_lib.compile_steps(config, mesh)
    batches = cache.iterate(input_pipeline.epoch_plan(len(source), 8, shuffle=True))
    state, _ = compiled.train(state, input_pipeline.device_batch(next(batches)), rng)
    with jax.transfer_guard_device_to_device("disallow"):
        for batch in batches:
            state, _ = compiled.train(state, input_pipeline.device_batch(batch), rng)
        jax.block_until_ready(state)
    np.savez(out, step=np.array(int(state.step)))


if __name__ == "__main__":
    from absl import logging

    logging.set_verbosity(logging.INFO)
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "steps":
        run_steps(out, int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    elif mode == "cache":
        run_cache(out)
    else:
        epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        run_train(out, sys.argv[3], sys.argv[4], epochs, sys.argv[6:])
