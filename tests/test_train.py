"""Training: a smoke run on the real data, resume, and the plateau schedule."""

import gc
import json
import re

import jax
import numpy as np
import pytest

import lggunet
from lggunet import parallel, report, steps, train
from lggunet.configs import demo
from lggunet.errors import ConfigError
from tests.helpers.tiny import fresh_state


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
        "gc_full_ms",
        "gc_epoch_end_ms",
    ):
        assert np.isfinite(records[0][key]), key
    assert records[0]["gc_full_collections"] >= 0
    assert gc.get_freeze_count() == 0  # lggunet.host_gc gave the frozen objects back
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
    state = fresh_state(config)
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
    state = fresh_state(config)
    for val_loss in (-0.5, -0.4):  # one epoch without improvement: halve
        state = steps.step_plateau(state, val_loss, config)
    assert steps.learning_rate(state) == pytest.approx(5e-4)
    grads = jax.tree.map(np.ones_like, state.params)
    moved = state.apply_gradients(grads=grads)
    delta = jax.tree.map(lambda a, b: np.asarray(a - b), moved.params, state.params)
    # Adam's first step moves every weight by -lr * g / (|g| + eps) = -lr.
    for d in jax.tree.leaves(delta):
        np.testing.assert_allclose(d, -5e-4, rtol=1e-3)


def _cosine_reference(step, peak, warmup, total):
    """The schedule written out with NumPy: linear warm-up to `peak`, then half a cosine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + np.cos(np.pi * min((step - warmup) / (total - warmup), 1.0)))


@pytest.mark.parametrize("warmup", [0, 4])
def test_cosine_schedule_matches_its_formula(warmup):
    schedule = steps.CosineSchedule(peak=2e-3, warmup_steps=warmup, total_steps=20)
    for step in range(25):
        want = _cosine_reference(step, 2e-3, warmup, 20)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    # Hand-computed points: the peak after warm-up, half of it halfway through the decay.
    assert float(schedule(warmup)) == pytest.approx(2e-3)
    assert float(schedule(warmup + (20 - warmup) // 2)) == pytest.approx(1e-3, rel=1e-5)
    assert float(schedule(20)) == pytest.approx(0.0, abs=1e-12)


def test_cosine_run_sets_the_rate_each_step_and_ignores_the_plateau(tiny_config, tmp_path):
    config = tiny_config
    config.data.phantom = True
    config.num_epochs = 3
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.plateau.patience = 0  # would halve the rate after every epoch under "plateau"
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    records = read_jsonl(workdir / "metrics.jsonl")
    per_epoch = records[0]["step"]
    assert [r["step"] for r in records] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    for r in records:  # the rate of each epoch's last update (step r["step"] - 1)
        want = _cosine_reference(r["step"] - 1, 1e-3, per_epoch, 3 * per_epoch)
        assert r["learning_rate"] == pytest.approx(want, rel=1e-5, abs=1e-10)
    assert records[0]["learning_rate"] == pytest.approx(1e-3)  # end of warm-up: the peak
    assert records[-1]["learning_rate"] < 1e-3 * 0.05

    # Which checkpoint a model loads: the best by validation loss, the last, or a step.
    best_epoch = json.loads((workdir / "final_metrics.json").read_text())["best_epoch"]
    assert lggunet.load_model(str(workdir)).step == best_epoch * per_epoch
    assert lggunet.load_model(str(workdir), checkpoint="last").step == 3 * per_epoch
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({best_epoch * per_epoch, 3 * per_epoch})
    for step in kept:
        assert lggunet.load_model(str(workdir), checkpoint=step).step == step
    missing = re.escape(f"no checkpoint at step 1; it keeps steps {kept}")
    with pytest.raises(ConfigError, match=missing):
        lggunet.load_model(str(workdir), checkpoint=1)
    with pytest.raises(ConfigError, match="checkpoint='first': use 'best'"):
        lggunet.load_model(str(workdir), checkpoint="first")
    # --mode=evaluate with evaluate.checkpoint="last" scores the last one and says so.
    config.evaluate.checkpoint = "last"
    scored = report.evaluate_run(config, workdir, splits=("test",))
    assert scored["checkpoint"]["step"] == 3 * per_epoch
    assert scored["checkpoint"]["chosen"] == "last"
    assert "Checkpoint: the last, step" in (workdir / "report.md").read_text()


def test_a_run_without_validation_trains_on_the_rest_resumes_and_reports(tiny_config, tmp_path):
    config = tiny_config
    config.data.phantom = True
    config.data.split_fractions = (0.75, 0.0, 0.25)  # every patient outside test trains
    config.lr_schedule, config.evaluate.checkpoint = "cosine", "last"
    config.early_stopping.patience, config.num_epochs = 0, 2
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    assert "validation" not in final and np.isfinite(final["test"]["volume_dice"])
    recorded = json.loads((workdir / "splits.json").read_text())["patients"]
    assert recorded["validation"] == [] and recorded["test"]
    assert not set(recorded["train"]) & set(recorded["test"])
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert not [k for r in records for k in r if k.startswith("val_")]
    assert (workdir / "curves.png").stat().st_size and (workdir / "test_predictions.png").exists()

    # A kill between the last checkpoint and its log line: the record comes back from the
    # checkpoint when the command is rerun.
    (workdir / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    train.train_and_evaluate(config, str(workdir))
    assert read_jsonl(workdir / "metrics.jsonl") == records

    scored = report.evaluate_run(config, workdir)
    assert set(scored["splits"]) == {"train", "test"}
    assert "val_loss n/a" in (workdir / "report.md").read_text()
    config.evaluate.checkpoint = "best"  # nothing to choose it by
    with pytest.raises(ConfigError, match="no validation split, but evaluate.checkpoint='best'"):
        report.evaluate_run(config, workdir)
    # Nor with a config that has validation (the run's own split is what counts), nor by hand:
    # 'best' never quietly means the last.
    config.data.split_fractions, config.lr_schedule = (0.8, 0.1, 0.1), "plateau"
    with pytest.raises(ConfigError, match="trained without a validation split.*use 'last'"):
        report.evaluate_run(config, workdir)
    with pytest.raises(ConfigError, match="trained without a validation split"):
        lggunet.load_model(str(workdir), checkpoint="best")
    assert lggunet.load_model(str(workdir)).step == records[-1]["step"]  # the run's own: last


def test_step_plateau_leaves_a_cosine_run_alone():
    config = demo.get_config()
    config.lr_schedule = "cosine"
    config.plateau.patience = 0
    state = fresh_state(config)
    after = steps.step_plateau(state, 5.0, config)
    assert after is state


def test_cosine_needs_the_epoch_length_to_train():
    config = demo.get_config()
    config.lr_schedule = "cosine"
    with pytest.raises(ValueError, match="steps_per_epoch"):
        steps.compile_steps(config, parallel.data_mesh())
    assert steps.StepOptions.from_config(config).cosine is None  # evaluation needs none


def test_an_instance_norm_run_trains_resumes_and_scores_alike(tiny_config, tmp_path, caplog):
    """model.norm="instance": no running statistics are kept or restored; the loaded model's
    probabilities are the network applied to the checkpoint's weights by hand, and
    --mode=evaluate reproduces the run's final test scores."""
    config = tiny_config
    config.data.phantom = True
    config.model.norm = "instance"
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    model = lggunet.load_model(str(workdir))
    assert not jax.tree.leaves(model.variables.get("batch_stats", {}))
    assert "norm='instance'" in repr(model)
    volume = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    module = lggunet.models.UNet(
        features=config.model.features, depth=config.model.depth, norm="instance"
    )
    assert (model.normalize, model.tta, model.image_size) == ("scale", False, 32)
    x = volume.astype(np.float32) / 255
    by_hand = jax.nn.sigmoid(module.apply({"params": model.variables["params"]}, x))[..., 0]
    np.testing.assert_allclose(model(volume), by_hand, atol=1e-5)
    scored = report.evaluate_run(config, workdir, splits=("test",))["splits"]["test"]
    plain = scored["variants"]["plain"]
    assert plain["volume_dice"]["mean"] == pytest.approx(final["test"]["volume_dice"], abs=1e-6)
    config.num_epochs = 2  # resume from the first epoch's checkpoint
    again = train.train_and_evaluate(config, str(workdir))
    assert again["test"]["loss"] != final["test"]["loss"]
    config.num_epochs = 1  # fewer than trained: nothing to train, and it says so
    assert train.train_and_evaluate(config, str(workdir))["test"] == again["test"]
    assert "2 epochs trained, num_epochs=1: none to train" in caplog.text


def test_a_deep_supervision_run_trains_resumes_and_predicts_with_the_full_size_output(
    tiny_config, tmp_path
):
    """model.deep_supervision=1: the loaded model reads the checkpoint without the head (which
    prediction never runs), its probabilities are the plain U-Net applied by hand to those
    weights, --mode=evaluate reproduces the run's final test scores, and the run resumes."""
    config = tiny_config
    config.data.phantom = True
    config.model.deep_supervision = 1
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    model = lggunet.load_model(str(workdir))
    params = model.variables["params"]
    assert "DeepSupervision_1" not in params and "Conv_0" in params
    volume = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    plain = lggunet.models.UNet(features=config.model.features, depth=config.model.depth)
    variables = {"params": params, "batch_stats": model.variables["batch_stats"]}
    x = volume.astype(np.float32) / 255
    by_hand = jax.nn.sigmoid(plain.apply(variables, x))[..., 0]
    np.testing.assert_allclose(model(volume), by_hand, atol=1e-5)
    scored = report.evaluate_run(config, workdir, splits=("test",))["splits"]["test"]
    plain_scores = scored["variants"]["plain"]
    assert plain_scores["volume_dice"]["mean"] == pytest.approx(
        final["test"]["volume_dice"], abs=1e-6
    )
    config.num_epochs = 2  # resume from the first epoch's checkpoint (the head's weights too)
    again = train.train_and_evaluate(config, str(workdir))
    assert again["test"]["loss"] != final["test"]["loss"]
