"""Data parallelism over simulated CPU devices and over two processes (jax.distributed).

The device count is fixed when JAX starts, so every configuration runs in its own
interpreter (tests/helpers/parallel_worker.py) with XLA_FLAGS forcing N host devices.

Tolerance: float32 all-reduces add in a different order than one device does, so parameters
agree to rtol 1e-4 / atol 2e-5 - except the biases of convolutions followed by BatchNorm.
BatchNorm subtracts the batch mean, so their true gradient is exactly zero and what they get
is rounding noise, which Adam scales to up to +-learning_rate per step on any device count;
for them the bound is steps x learning_rate (the demo config's 1e-3), and the running means
of the BatchNorm right after them (momentum 0.99) may differ by 1% of that.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LEARNING_RATE = 1e-3


def run_worker(args, devices=1, env=None, timeout=600):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "tests.helpers.parallel_worker", *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def assert_same_training(a_path, b_path, steps):
    """Same training up to summation order (see the module docstring)."""
    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files)
    if "losses" in a.files:  # forward passes over the global batch, BatchNorm included
        np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    max_move = steps * LEARNING_RATE  # Adam moves a weight by at most ~lr per step
    moves, gaps = [], []
    for key in a.files:
        if key in ("losses", "step") or key.startswith("init"):
            continue
        diff = np.abs(a[key] - b[key])
        if "batch_stats" in key:
            bound = 2e-5 + (0.01 * max_move if "['mean']" in key else 0.0)
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=bound, err_msg=key)
        elif "['ConvBlock_" in key and "['Conv_" in key and "bias" in key:
            np.testing.assert_array_less(diff, max_move + 1e-7, err_msg=key)
        else:
            np.testing.assert_array_less(diff, 0.05 * max_move, err_msg=key)
            if "init" + key in a.files:
                moves.append((a[key] - a["init" + key]).ravel())
                gaps.append((a[key] - b[key]).ravel())
    if moves:  # the updates themselves agree: relative difference of the update vectors
        moves, gaps = np.concatenate(moves), np.concatenate(gaps)
        assert np.linalg.norm(gaps) < 1e-3 * np.linalg.norm(moves)


@pytest.mark.parametrize("devices", [2, 4])
def test_train_steps_on_several_devices_match_one_device(devices, tmp_path):
    steps = 4
    one = run_worker(["steps", tmp_path / "one.npz", steps], devices=1)
    many = run_worker(["steps", tmp_path / "many.npz", steps], devices=devices)
    finish(one), finish(many)
    assert_same_training(tmp_path / "one.npz", tmp_path / "many.npz", steps)


def test_long_two_device_run_does_not_deadlock(tmp_path):
    """Many steps through the real loop on 2 CPU devices (XLA's CPU all-reduce once
    deadlocked with ~50 steps in flight; the loop waits for each step's metrics)."""
    proc = run_worker(
        ["train", tmp_path / "out.npz", tmp_path / "run", tmp_path / "tfds", 6, "batch=2"],
        devices=2,
    )
    out = finish(proc, timeout=900)
    assert "Devices: 2 (1 processes), global batch 2 = 1 per device" in out
    assert int(np.load(tmp_path / "out.npz")["step"]) >= 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(port: int, index: int, of: int) -> dict[str, str]:
    """The environment that makes a process number `index` of a jax.distributed run."""
    return {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(of),
        "JAX_PROCESS_ID": str(index),
    }


def test_two_processes_train_like_one(tmp_path):
    """jax.distributed on loopback with gloo CPU collectives: two processes, one device each,
    each reading half of every global batch, end with identical parameters, equal to a
    one-process run with the same global batch."""
    data_dir = tmp_path / "tfds"
    single = run_worker(["train", tmp_path / "single.npz", tmp_path / "single", data_dir, 1])
    finish(single)  # also prepares the phantom data set the two processes then share
    port = free_port()
    procs = [
        run_worker(
            ["train", tmp_path / f"p{i}.npz", tmp_path / "multi", data_dir, 1],
            env=process_env(port, i, of=2),
        )
        for i in range(2)
    ]
    outs = [finish(p) for p in procs]
    assert "Devices: 2 (2 processes)" in outs[0]
    p0, p1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
    for key in p0.files:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    assert_same_training(tmp_path / "single.npz", tmp_path / "p0.npz", steps=5)
    # Only process 0 wrote the run's files; the checkpoint was written once, collectively.
    assert (tmp_path / "multi" / "metrics.jsonl").exists()
    assert len(list((tmp_path / "multi" / "checkpoints").iterdir())) == 1


def test_device_cache_feeds_eight_devices_without_device_to_device_copies(tmp_path):
    """The cached split is placed on every device of the mesh: steady-state steps gather
    their rows locally (a transfer guard disallows device-to-device copies)."""
    out = tmp_path / "cache.npz"
    finish(run_worker(["cache", out], devices=8))
    assert int(np.load(out)["step"]) == 5  # 40 examples, batch 8


def test_host_devices_auto_is_one_per_core_dividing_both_batch_sizes():
    from lggunet import parallel
    from lggunet.configs import cpu, unet

    config = cpu.get_config()  # host_devices 0 (auto), batch 16, eval batch 32
    counts = [parallel.host_device_count(config, cores) for cores in (1, 2, 3, 4, 16, 64)]
    assert counts == [1, 2, 2, 4, 4, 4]  # at most AUTO_MAX_HOST_DEVICES
    config.batch_size, config.eval_batch_size = 12, 32
    assert parallel.host_device_count(config, cores=3) == 2  # 12 and 32: 3 splits only one
    config.host_devices = 3
    assert parallel.host_device_count(config, cores=2) == 3  # asked for: taken as given
    assert parallel.host_device_count(unet.get_config(), cores=16) == 1  # the default
    config.host_devices = 0
    config.distributed.coordinator_address = "127.0.0.1:1234"
    assert parallel.host_device_count(config, cores=16) == 1  # one device per process


def test_host_devices_that_split_no_batch_evenly_are_refused_up_front(monkeypatch, caplog):
    from lggunet import parallel
    from lggunet.configs import cpu
    from lggunet.errors import ConfigError

    config = cpu.get_config()
    assert parallel.use_host_devices(config) is None  # JAX has started (conftest): too late
    assert "JAX started with 1 CPU devices before it could ask for 2" in caplog.text
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
    assert parallel.use_host_devices(config) is None  # the environment's count wins
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES")
    config.host_devices = 3
    with pytest.raises(ConfigError, match=r"host_devices=3: batch_size=16 must divide among"):
        parallel.use_host_devices(config)  # before it asks JAX for anything


def run_cli(args, tmp_path, env=None):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")},
        "TFDS_DATA_DIR": str(tmp_path / "tfds"),
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    tiny = [
        "--config=configs/demo.py",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.num_epochs=1",
        "--config.data.phantom_patients=10",
        "--config.data.phantom_slices=8",
        "--config.data.image_size=32",
    ]
    cmd = [sys.executable, str(REPO / "run.py"), *tiny, *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_run_splits_the_cpu_into_the_asked_devices_and_xla_flags_win(tmp_path):
    split = run_cli([f"--workdir={tmp_path / 'a'}", "--config.host_devices=2"], tmp_path)
    assert "Devices: 2 (1 processes), global batch 8 = 4 per device" in finish(split)
    forced = "--xla_force_host_platform_device_count=1"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import jax; from lggunet import parallel; from lggunet.configs import cpu; "
            "print(parallel.use_host_devices(cpu.get_config()), jax.device_count())",
        ],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": forced, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.stdout.split() == ["None", "1"], probe.stderr[-2000:]


def test_two_run_py_processes_train_as_one_distributed_run(tmp_path):
    """The command line joins jax.distributed before anything starts JAX (the config check
    counts devices; done first, it made jax.distributed.initialize refuse to run)."""
    port = free_port()
    procs = [
        run_cli(
            [f"--workdir={tmp_path / 'multi'}", "--config.host_devices=0"],
            tmp_path,
            env=process_env(port, i, of=2),
        )
        for i in range(2)
    ]
    outs = [finish(p) for p in procs]
    assert "Devices: 2 (2 processes), global batch 8 = 4 per device" in outs[0]
    assert (tmp_path / "multi" / "final_metrics.json").exists()
