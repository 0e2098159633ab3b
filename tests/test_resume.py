"""Interrupting training: SIGTERM mid-epoch saves a checkpoint with the position in the data;
rerunning continues and ends exactly where an uninterrupted run ends. Also NaN and early stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lggunet import (
    checkpointing,
    history,
    inference,
    losses,
    parallel,
    report,
    steps,
    train,
    workdirs,
)
from lggunet.configs import demo
from lggunet.errors import TrainingDiverged
from lggunet.interrupts import Interrupted

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "data.image_size": 32,
    "model.features": 4,
    "model.depth": 2,
    "batch_size": 4,
    "eval_batch_size": 8,
    "num_epochs": 2,
    "log_every_steps": 1,
    "summary_images": 2,
    "data.num_threads": 2,
    "data.phantom_patients": 12,
    "data.phantom_slices": 20,
}


def make_config(data_dir):
    config = demo.get_config()
    for key, value in OVERRIDES.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.data.data_dir = str(data_dir)
    return config


def command(workdir, data_dir):
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return [
        sys.executable,
        "run.py",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *args,
    ]


def start(workdir, data_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        command(workdir, data_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def latest_state(workdir, config):
    """(parameters and BatchNorm statistics on the host, checkpoint meta, state) of the
    workdir's latest checkpoint."""
    template, _ = steps.initial_state(config, parallel.data_mesh())
    store = checkpointing.CheckpointStore(Path(workdir) / "checkpoints")
    state, meta = store.restore_latest(template)
    store.close()
    return jax.device_get({"params": state.params, "stats": state.batch_stats}), meta, state


def test_sigterm_mid_epoch_then_rerun_ends_like_an_uninterrupted_run(tmp_path, caplog):
    data_dir = tmp_path / "tfds"
    whole = start(tmp_path / "whole", data_dir)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out[-3000:]
    steps_per_epoch = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().split("\n")[0])[
        "step"
    ]

    cut = start(tmp_path / "cut", data_dir)
    target = f"step {steps_per_epoch + 3}/"  # a few batches into epoch 2
    seen = []
    for line in cut.stdout:
        seen.append(line)
        if target in line:
            cut.send_signal(signal.SIGTERM)
            break
    rest, _ = cut.communicate(timeout=300)
    log = "".join(seen) + rest
    assert cut.returncode == 143, log[-3000:]  # 128 + SIGTERM: not finished, rerun to continue
    assert "checkpoint saved" in log
    _, meta, _ = latest_state(tmp_path / "cut", make_config(data_dir))
    assert meta["epoch"] == 2 and 0 < meta["position"] < steps_per_epoch, meta  # mid-epoch
    assert not (tmp_path / "cut" / "final_metrics.json").exists()
    # Loading the stopped run's model works, with a warning that names it unfinished.
    with caplog.at_level(logging.WARNING):
        stopped = inference.load_model(tmp_path / "cut", checkpoint="last")
    assert stopped.step == meta["step"]
    warned = f"has not finished (no final_metrics.json): using checkpoint {stopped.step} "
    assert warned in caplog.text

    # The checkpoints resume only with the same settings (here: the same batches).
    other = subprocess.run(
        command(tmp_path / "cut", data_dir) + ["--config.batch_size=8"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2, other.stderr
    assert "other settings (batch_size: 4 -> 8)" in other.stderr, other.stderr

    again = start(tmp_path / "cut", data_dir)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert f"Resumed in epoch 2 after {meta['position']} batches" in out
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inference.load_model(tmp_path / "cut", checkpoint="last")
    assert "has not finished" not in caplog.text

    a, meta_a, _ = latest_state(tmp_path / "whole", make_config(data_dir))
    b, meta_b, _ = latest_state(tmp_path / "cut", make_config(data_dir))
    assert meta_a["step"] == meta_b["step"] == 2 * steps_per_epoch
    # Same arithmetic on the same data in the same order: equal to float32 rounding (measured
    # bit-identical on CPU; the bound leaves room for a backend that is not).
    gaps = [
        np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    print(f"largest parameter difference after resume: {max(gaps)}")
    assert max(gaps) <= 1e-6
    for key in ("train_loss", "val_loss", "val_dice", "learning_rate"):
        assert meta_a[key] == pytest.approx(meta_b[key], abs=1e-6), key


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_config, tmp_path, monkeypatch
):
    config = tiny_config
    config.data.phantom_patients = 6
    config.data.phantom_slices = 10
    config.batch_size = 8
    workdir = tmp_path / "run"
    state_1, _ = train.run_training(config, str(workdir))
    assert workdirs.finished(workdir)
    steps_per_epoch = int(state_1.step)

    def broken(run):
        raise RuntimeError("stopped before writing the final metrics")

    # A rerun that trains nothing more leaves the finished run finished, even if it fails.
    monkeypatch.setattr(train, "_final_evaluation", broken)
    with pytest.raises(RuntimeError, match="before writing"):
        train.run_training(config, str(workdir))
    monkeypatch.undo()
    assert workdirs.finished(workdir)
    good = jax.device_get(state_1.params)

    def nan_loss(logits, masks, weights=None):
        return losses.dice_loss(logits, masks, weights) * np.nan

    monkeypatch.setitem(losses.LOSSES, "dice", nan_loss)
    config.num_epochs = 2
    with pytest.raises(TrainingDiverged, match=f"loss is nan at step {steps_per_epoch + 1}"):
        train.run_training(config, str(workdir))
    monkeypatch.undo()
    # Trained further and stopped: no longer taken for the finished 1-epoch run.
    assert not workdirs.finished(workdir)
    report.evaluate_run(config, workdir, splits=("validation",))
    assert "**Training has not finished**" in (workdir / "report.md").read_text()
    store = checkpointing.CheckpointStore(workdir / "checkpoints")
    assert store.latest_step() == steps_per_epoch  # nothing was saved after the NaN
    restored, meta = store.restore_latest(state_1)
    store.close()
    assert meta["epoch"] == 1
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(restored.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_early_stopping_stops_after_patience_epochs_without_improvement(tiny_config, tmp_path):
    config = tiny_config
    config.data.phantom_patients = 6
    config.data.phantom_slices = 10
    config.batch_size = 8
    config.num_epochs = 6
    config.early_stopping.patience = 2
    config.early_stopping.min_delta = 10.0  # no epoch can improve on the first by that much
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # best epoch 1, then 2 without
    assert final["stopped_early_after_epoch"] == 3 and final["best_epoch"] in (1, 2, 3)
    # A rerun does not train on past the stop.
    again = train.train_and_evaluate(config, str(workdir))
    assert again["stopped_early_after_epoch"] == 3
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3


def test_early_stopping_rule():
    rule = history.EarlyStopping(patience=2, min_delta=0.01)
    # improves, improves by less than min_delta (no), no, -> stop at epoch 4
    assert [rule.update(e, v) for e, v in enumerate([-0.5, -0.6, -0.605, -0.59], 1)] == [
        False,
        False,
        False,
        True,
    ]
    assert rule.best_epoch == 2 and rule.best_loss == -0.6
    assert not history.EarlyStopping(patience=0, min_delta=0).update(10, 1.0)  # 0 = off


def test_bfloat16_trains_with_float32_parameters(tiny_config):
    config = tiny_config
    config.dtype = "bfloat16"
    config.learning_rate = 1e-2
    config.augment.enabled = False
    mesh = parallel.data_mesh()
    state, rng = steps.initial_state(config, mesh)
    compiled = steps.compile_steps(config, mesh)
    data = np.random.default_rng(0)
    masks = np.zeros((8, 32, 32, 1), np.uint8)
    masks[:, 8:24, 8:20] = 1
    batch = {
        "image": (data.integers(0, 60, (8, 32, 32, 3)) + 150 * masks).astype(np.uint8),
        "mask": masks,
        "valid": np.ones(8, bool),
        "volume_mean": np.zeros((8, 3), np.float32),
        "volume_std": np.ones((8, 3), np.float32),
    }
    batch = parallel.global_batch(batch, mesh)
    jaxpr = str(
        jax.make_jaxpr(lambda s, b: train.train_step(s, b, rng, steps.StepOptions(image_size=32)))(
            state, batch
        )
    )
    assert "bf16" in jaxpr  # the convolutions really run in bfloat16
    seen = []
    for _ in range(15):
        state, out = compiled.train(state, batch, rng)
        seen.append(float(out["loss"]))
    assert seen[-1] < seen[0] - 0.1, seen  # -Dice falls
    for tree in (state.params, state.opt_state, state.batch_stats):
        for leaf in jax.tree.leaves(tree):
            if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
                assert leaf.dtype == jax.numpy.float32
    assert out["loss"].dtype == jax.numpy.float32


def test_a_run_without_validation_stopped_mid_epoch_resumes_to_the_same_end(
    tiny_config, tmp_path, monkeypatch
):
    config = tiny_config
    config.data.phantom = True
    config.data.phantom_patients, config.data.phantom_slices = 8, 12
    config.data.split_fractions = (0.75, 0.0, 0.25)  # no validation split
    config.lr_schedule, config.evaluate.checkpoint = "cosine", "last"
    config.early_stopping.patience, config.num_epochs = 0, 2
    config.batch_size, config.log_every_steps = 8, 1
    whole, _ = train.run_training(config, str(tmp_path / "whole"))
    per_epoch = int(whole.step) // 2
    assert per_epoch >= 4

    logged = train._log_step

    def stop_in_epoch_2(run, epoch, step, out):
        logged(run, epoch, step, out)
        if step == per_epoch + 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_log_step", stop_in_epoch_2)
    with pytest.raises(Interrupted):
        train.run_training(config, str(tmp_path / "cut"))
    monkeypatch.setattr(train, "_log_step", logged)
    _, meta, _ = latest_state(tmp_path / "cut", config)
    assert meta["epoch"] == 2 and 0 < meta["position"] < per_epoch, meta
    assert not any(k.startswith("val_") for k in meta)
    assert not workdirs.finished(tmp_path / "cut")

    resumed, final = train.run_training(config, str(tmp_path / "cut"))
    assert int(resumed.step) == int(whole.step) and "validation" not in final
    a, b = (jax.device_get((s.params, s.batch_stats)) for s in (whole, resumed))
    gaps = [
        np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    assert max(gaps) <= 1e-6
    records = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "cut")
    ]
    assert [r["epoch"] for r in records[1]] == [1, 2]
    for x, y in zip(*records, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
