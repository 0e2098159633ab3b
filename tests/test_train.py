"""Training: a smoke run on the real data, resume, and the plateau schedule."""

import json

import jax
import numpy as np
import pytest

from lggunet import steps, train
from lggunet.configs import demo


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_train_writes_checkpoint_and_resumes(tiny_config, real_data, real_tfds_dir, tmp_path):
    config = tiny_config
    config.data.manual_dir = str(real_data)
    config.data.data_dir = str(real_tfds_dir)  # reuse the session's prepared copy
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(config, str(workdir))
    steps_per_epoch = -(-722 // config.batch_size)  # 23 training patients, 722 slices
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    assert records[0]["step"] == steps_per_epoch
    assert (workdir / "checkpoints" / str(steps_per_epoch)).is_dir()  # named by global step
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    for key in (
        "train_loss",
        "val_loss",
        "val_dice",
        "val_iou",
        "val_accuracy",
        "val_volume_dice",
        "learning_rate",
        "images_per_s",
    ):
        assert np.isfinite(records[0][key]), key
    assert first["test"]["num_slices"] == 91 and len(first["test"]["per_volume_dice"]) == 3
    assert first["validation"]["num_slices"] == 96

    config.num_epochs = 2
    train.train_and_evaluate(config, str(workdir))
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["step"] == 2 * steps_per_epoch  # resumed at step 23, not from zero
    assert all(np.isfinite(r["train_loss"]) for r in records)


def test_plateau_halves_after_patience_epochs_and_not_before():
    config = demo.get_config()
    config.learning_rate = 1e-3
    config.plateau.patience = 3
    state = steps.create_train_state(config, jax.random.key(0))
    # Improvement, then 3 epochs without (the last one improves by less than min_delta).
    losses = [-0.50, -0.60, -0.59, -0.58, -0.60005]
    rates = []
    for val_loss in losses:
        state = steps.step_plateau(state, val_loss, config)
        rates.append(steps.learning_rate(state))
    np.testing.assert_allclose(rates, [1e-3, 1e-3, 1e-3, 1e-3, 5e-4], rtol=1e-6)
    # The counter restarts after a cut: 2 more bad epochs keep the rate, the 3rd halves it.
    for val_loss in (-0.55, -0.55):
        state = steps.step_plateau(state, val_loss, config)
        assert steps.learning_rate(state) == pytest.approx(5e-4)
    state = steps.step_plateau(state, -0.55, config)
    assert steps.learning_rate(state) == pytest.approx(2.5e-4)
    # And a real improvement resets it.
    state = steps.step_plateau(state, -0.70, config)
    assert steps.learning_rate(state) == pytest.approx(2.5e-4)


def test_plateau_rate_reaches_adam():
    config = demo.get_config()
    config.learning_rate = 1e-3
    config.plateau.patience = 1
    state = steps.create_train_state(config, jax.random.key(0))
    for val_loss in (-0.5, -0.4):  # one epoch without improvement: halve
        state = steps.step_plateau(state, val_loss, config)
    assert steps.learning_rate(state) == pytest.approx(5e-4)
    grads = jax.tree.map(np.ones_like, state.params)
    moved = state.apply_gradients(grads=grads)
    delta = jax.tree.map(lambda a, b: np.asarray(a - b), moved.params, state.params)
    # Adam's first step moves every weight by -lr * g / (|g| + eps) = -lr.
    for d in jax.tree.leaves(delta):
        np.testing.assert_allclose(d, -5e-4, rtol=1e-3)
