"""Checkpoint faults (kill -9 mid-save, a full disk, a corrupted latest checkpoint), config
errors before any work, fuzzed TIFF bytes, and no unpickling of anything in the workdir."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lggunet import checkpointing, inference, train
from tests.helpers import checkpoint_worker

REPO = Path(__file__).resolve().parents[1]


def worker(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.checkpoint_worker", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_kill_9_during_saves_always_leaves_a_complete_checkpoint(tmp_path):
    directory, mb = tmp_path / "ckpt", 40  # ~0.3 s per save here: kills land mid-write
    rng = random.Random(0)
    last_started = 0
    for _ in range(4):
        proc = worker("loop", directory, mb)
        first = None
        for line in proc.stdout:
            kind, step = line.split()
            if kind == "saving":
                first = first or int(step)
                if int(step) >= first + 1:
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc.send_signal(signal.SIGKILL)
                    last_started = int(step)
                    break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        store = checkpointing.CheckpointStore(directory)
        restored, meta = store.restore_latest(checkpoint_worker.state(0, mb))
        store.close()
        step = meta["epoch"]
        assert step in (last_started - 1, last_started)  # the save in flight, or the one before
        expected = checkpoint_worker.state(step, mb)
        np.testing.assert_array_equal(restored["w"], expected["w"])
        np.testing.assert_array_equal(restored["b"], expected["b"])


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_earlier_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    proc = worker("fsize", directory)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert f"CheckpointError: could not write checkpoint 2 in {directory}" in out
    assert "File too large" in out and "Earlier checkpoints are untouched: steps [1]" in out
    store = checkpointing.CheckpointStore(directory)
    assert store.latest_step() == 1
    restored, meta = store.restore_latest(checkpoint_worker.state(0, 0.05))
    store.close()
    np.testing.assert_array_equal(restored["w"], checkpoint_worker.state(1, 0.05)["w"])


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    store = checkpointing.CheckpointStore(directory)
    store.save(1, checkpoint_worker.state(1, 0.1), {"epoch": 1, "val_loss": -1.0})
    store.save(2, checkpoint_worker.state(2, 0.1), {"epoch": 2, "val_loss": -0.5})  # worse
    store.close()
    for f in (directory / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 3)
    store = checkpointing.CheckpointStore(directory)
    restored, meta = store.restore_latest(checkpoint_worker.state(0, 0.1))
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(restored["w"], checkpoint_worker.state(1, 0.1)["w"])
    assert "Checkpoint" in caplog.text and "cannot be read" in caplog.text
    # The unreadable one is moved aside, so training can save step 2 again.
    assert [p.name.split("-")[0] for p in (tmp_path / "ckpt_unreadable").iterdir()] == ["2"]
    store.save(2, checkpoint_worker.state(2, 0.1), {"epoch": 2, "val_loss": -0.5})
    assert store.steps() == [1, 2]
    store.close()


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "run.py", "--config=configs/demo.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--config.batch_sizee=4"], 2, 'Did you mean "batch_size"'),
        (["--config.batch_size=abc"], 2, "--config.batch_size=abc: invalid literal for int()"),
        (["--config.num_epochs=1.5"], 2, "error: flag --config.num_epochs=1.5"),
        (["--config.data.split_fractions=('a','b','c')"], 2, "data.split_fractions=('a', 'b'"),
        (["--workdir="], 2, "error: --workdir is empty"),
        (["--workdir=/tmp/x\nerror: forged"], 2, "error: --workdir=/tmp/x\\nerror: forged: the"),
        (["--config.batch_size=0"], 2, "batch_size=0 must be a positive multiple of the 1 dev"),
        (
            ["--config.data.split_fractions=(0.5,0.2,0.2)"],
            2,
            "split_fractions=(0.5, 0.2, 0.2) must be (train, validation, test), non-negative, "
            "summing to 1",
        ),
        (
            ["--config.data.image_size=100"],
            2,
            "data.image_size=100 must be a positive multiple of 2**model.depth=8",
        ),
    ],
)
def test_config_errors_come_before_any_work(args, code, message, tmp_path):
    workdir = tmp_path / "w"
    result = run_cli(f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}", *args)
    assert result.returncode == code, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tfds").exists()  # no data was prepared


def test_batch_not_divisible_by_devices_is_a_config_error(tmp_path):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'w'}",
            "--config.batch_size=7",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: batch_size=7 must be a positive multiple of the 2 devices" in result.stderr


def test_nothing_in_the_workdir_is_unpickled(tiny_config, tmp_path, monkeypatch):
    """Train, resume, evaluate and load a model with every unpickling entry point disabled."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class Refuse:
        def __init__(self, *args, **kwargs):
            refuse()

    config = tiny_config
    config.data.phantom_patients = 6
    config.data.phantom_slices = 10
    config.batch_size = 8
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))  # prepares data (tfds may use pickle)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    monkeypatch.setattr(np, "load", lambda *a, **k: refuse())
    config.num_epochs = 2
    train.train_and_evaluate(config, str(workdir))  # restores the checkpoint
    model = inference.load_model(workdir)
    assert model(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 64, 64)
    from lggunet import report

    report.evaluate_run(config, workdir)
    assert (workdir / "report.json").exists()
    # And no pickle files are written there either.
    assert not [p for p in workdir.rglob("*") if p.suffix in (".pkl", ".pickle", ".npy")]


def test_every_file_of_a_checkpoint_emptied_falls_back_or_restores(tmp_path):
    """Each file of the latest checkpoint in turn is emptied (orbax's metrics JSON, its
    metadata, the record, the array store): opening the folder never fails, and restoring
    gives either that checkpoint whole or the one before it, never an exception."""
    import shutil

    import jax.numpy as jnp

    base = tmp_path / "ck"
    store = checkpointing.CheckpointStore(base)
    store.save(1, {"a": jnp.ones(3)}, {"val_loss": 0.5, "epoch": 1})
    store.save(2, {"a": jnp.full(3, 2.0)}, {"val_loss": 0.7, "epoch": 2})
    store.close()
    files = sorted(p.relative_to(base) for p in (base / "2").rglob("*") if p.is_file())
    assert len(files) >= 8 and Path("2/metrics/metrics") in files
    fell_back = []
    for rel in files:
        copy = tmp_path / "copy" / "ck"
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(base, copy)
        (copy / rel).write_bytes(b"")
        store = checkpointing.CheckpointStore(copy)
        state, meta = store.restore_latest({"a": jnp.zeros(3)})
        assert (meta["epoch"], float(state["a"][0])) in {(2, 2.0), (1, 1.0)}, rel
        if meta["epoch"] == 1:
            fell_back.append(rel.as_posix())
            assert not (copy / "2").exists()  # moved aside, so step 2 can be saved again
            assert list((copy.parent / "ck_unreadable").iterdir())
        best_state, best = store.restore_best({"a": jnp.zeros(3)})
        assert best["epoch"] == 1 and float(best_state["a"][0]) == 1.0
        store.close()
    # The files a checkpoint cannot do without are among those that fell back.
    assert {"2/metrics/metrics", "2/meta/metadata", "2/state/_METADATA"} <= set(fell_back)


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path):
    """A kill mid-append leaves half a line; resuming drops it (and the epochs after the
    checkpoint) instead of failing on it."""
    from lggunet import history

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"epoch": 1, "val_loss": 0.5}\n{"epoch": 2, "val_loss": 0.4}\n{"epoch": 3, "va'
    )
    history.drop_epochs_after(path, 1)
    assert path.read_text() == '{"epoch": 1, "val_loss": 0.5}\n'
