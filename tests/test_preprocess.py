"""Normalisation and resizing shared by training, evaluation and prediction."""

import jax
import numpy as np
import pytest

from lggunet import losses, steps, train
from tests.helpers.tiny import fresh_state


def make_batch(rng, n=2, size=16):
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "mask": (rng.random((n, size, size, 1)) > 0.8).astype(np.uint8),
        "valid": np.array([True] * (n - 1) + [False]),
        "volume_mean": rng.uniform(10, 50, (n, 3)).astype(np.float32),
        "volume_std": rng.uniform(5, 20, (n, 3)).astype(np.float32),
    }


def test_scale_normalisation_is_x_over_255():
    batch = make_batch(np.random.default_rng(0))
    images, masks, weights = steps.preprocess(batch, 16, "scale")
    np.testing.assert_allclose(images, batch["image"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(masks, batch["mask"])
    np.testing.assert_array_equal(weights, [1.0, 0.0])


def test_zscore_uses_each_patients_volume_statistics():
    batch = make_batch(np.random.default_rng(1))
    images, _, _ = steps.preprocess(batch, 16, "zscore_volume")
    mean = batch["volume_mean"][:, None, None, :]
    std = batch["volume_std"][:, None, None, :]
    np.testing.assert_allclose(images, (batch["image"] - mean) / std, rtol=1e-5, atol=1e-5)


def test_resize_keeps_masks_binary_and_aligned():
    batch = make_batch(np.random.default_rng(2), size=32)
    batch["mask"][:] = 0
    batch["mask"][:, 8:24, 4:12] = 1
    images, masks, _ = steps.preprocess(batch, 16, "scale")
    assert images.shape == (2, 16, 16, 3) and masks.shape == (2, 16, 16, 1)
    expected = np.zeros((2, 16, 16, 1))
    expected[:, 4:12, 2:6] = 1
    np.testing.assert_array_equal(masks, expected)


def test_soft_targets_keep_the_bilinear_edge_of_a_downsized_mask():
    batch = make_batch(np.random.default_rng(5), size=16)
    batch["mask"][:] = 0
    batch["mask"][:, :, :8] = 1  # a vertical edge between columns 7 and 8
    _, binary, _ = steps.preprocess(batch, 8, "scale")
    _, soft, _ = steps.preprocess(batch, 8, "scale", soft=True)
    # By hand: halving with the bilinear (triangle) kernel weighs input columns 2j-1..2j+2 by
    # 1/8, 3/8, 3/8, 1/8, so output column 3 holds 7/8 of the mask and column 4 1/8.
    row = np.array([1, 1, 1, 0.875, 0.125, 0, 0, 0])
    np.testing.assert_allclose(soft[:, :, :, 0], np.broadcast_to(row, (2, 8, 8)), atol=1e-6)
    np.testing.assert_array_equal(binary[:, :, :, 0], np.broadcast_to(row >= 0.5, (2, 8, 8)))


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize"):
        steps.preprocess(make_batch(np.random.default_rng(3)), 16, "minmax")


def test_train_step_augments_with_the_step_key(tiny_config):
    config = tiny_config
    state = fresh_state(config)
    batch = make_batch(np.random.default_rng(4), n=4, size=32)
    options = steps.StepOptions.from_config(config)
    assert options.augment is not None  # on by default, with the notebook's values
    step = jax.jit(train.train_step, static_argnums=3)  # eagerly, each draw compiles alone
    a, out_a = step(state, batch, jax.random.key(1), options)
    b, out_b = step(state, batch, jax.random.key(1), options)
    c, out_c = step(state, batch, jax.random.key(2), options)
    assert float(out_a["loss"]) == float(out_b["loss"])
    assert float(out_a["loss"]) != float(out_c["loss"])
    config.augment.enabled = False
    assert steps.StepOptions.from_config(config).augment is None
    config.augment.enabled = True
    config.augment.preset = "buda2019"
    assert steps.StepOptions.from_config(config).augment.rotation_range == 15.0


def test_train_step_trains_on_soft_targets_when_asked(tiny_config):
    config = tiny_config  # 32x32 inputs
    config.augment.enabled = False
    state = fresh_state(config)
    batch = make_batch(np.random.default_rng(6), n=4, size=48)  # resized to 32: soft edges
    binary = steps.StepOptions.from_config(config)
    config.soft_targets = True
    soft = steps.StepOptions.from_config(config)
    assert soft.soft_targets and not binary.soft_targets
    # The loss of the first step, on the targets each option resizes to.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    for options, mask_soft in ((binary, False), (soft, True)):
        images, masks, weights = steps.preprocess(batch, 32, options.normalize, soft=mask_soft)
        logits = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])[0]
        expected = losses.get_loss(options.loss)(logits, masks, weights)
        _, out = train.train_step(state, batch, jax.random.key(1), options)
        np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    _, out_binary = train.train_step(state, batch, jax.random.key(1), binary)
    _, out_soft = train.train_step(state, batch, jax.random.key(1), soft)
    assert abs(float(out_binary["loss"]) - float(out_soft["loss"])) > 1e-4


def test_train_and_eval_steps_use_the_configured_tversky_beta(tiny_config):
    config = tiny_config
    config.augment.enabled = False
    config.loss = "bce_dice"
    state = fresh_state(config)
    batch = make_batch(np.random.default_rng(7), n=4, size=32)
    config.tversky_beta = 0.8
    options = steps.StepOptions.from_config(config)
    assert options.tversky_beta == 0.8
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images, masks, weights = steps.preprocess(batch, 32, options.normalize)
    logits = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])[0]
    p = np.asarray(jax.nn.sigmoid(logits), np.float64)[:3]  # the 4th example is padding
    t = np.asarray(masks, np.float64)[:3]
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    tp = np.sum(t * p)
    fp, fn = np.sum(p) - tp, np.sum(t) - tp
    tversky = (2 * tp + 100) / (2 * tp + 2 * 0.2 * fp + 2 * 0.8 * fn + 100)
    _, out = train.train_step(state, batch, jax.random.key(1), options)
    np.testing.assert_allclose(out["loss"], bce - tversky, rtol=1e-4)
    # Evaluation scores the same loss (the validation loss that picks the best checkpoint).
    probs = steps.probabilities(state, steps.normalized(batch, options.normalize), 32, False)
    p = np.asarray(probs, np.float64)[:3]
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    tp = np.sum(t * p)
    fp, fn = np.sum(p) - tp, np.sum(t) - tp
    tversky = (2 * tp + 100) / (2 * tp + 2 * 0.2 * fp + 2 * 0.8 * fn + 100)
    evaluated = steps.eval_step(state, batch, options)
    np.testing.assert_allclose(evaluated["loss"], bce - tversky, rtol=1e-4)


def test_train_step_minimises_the_topk_loss_the_config_names(tiny_config):
    """loss="topk_bce_dice": the train step's loss is the cross-entropy of the hardest 10% of
    the real examples' pixels (NumPy, the padding example left out) minus their Dice."""
    config = tiny_config
    config.augment.enabled = False
    config.loss = "topk_bce_dice"
    state = fresh_state(config)
    batch = make_batch(np.random.default_rng(9), n=4, size=32)
    options = steps.StepOptions.from_config(config)
    images, masks, _ = steps.preprocess(batch, 32, options.normalize)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])[0]
    p = np.asarray(jax.nn.sigmoid(logits), np.float64)[:3]  # the 4th example is padding
    t = np.asarray(masks, np.float64)[:3]
    per_pixel = np.sort((-(t * np.log(p) + (1 - t) * np.log(1 - p))).ravel())[::-1]
    hardest = per_pixel[: round(0.1 * per_pixel.size)].mean()
    dice = (2 * np.sum(t * p) + 100) / (np.sum(t) + np.sum(p) + 100)
    _, out = train.train_step(state, batch, jax.random.key(1), options)
    np.testing.assert_allclose(out["loss"], hardest - dice, rtol=1e-4)
    assert hardest > 1.5 * per_pixel.mean()  # not the plain BCE in disguise


def test_train_step_with_deep_supervision_adds_the_heads_loss(tiny_config):
    """model.deep_supervision=1 (depth 2): the train step minimises (L0 + L1 / 2) / 1.5, where
    L0 is BCE + Dice of the full-size logits and L1 that of the level-1 head against the 2x2
    block majority of the masks, its Dice smooth 100 / 4 (NumPy here); the head's weights
    learn; the validation loss stays the full-size output's (it picks the best checkpoint)."""
    config = tiny_config  # 32x32 inputs, depth 2
    config.augment.enabled = False
    config.loss = "bce_dice"
    config.model.deep_supervision = 1
    state = fresh_state(config)
    batch = make_batch(np.random.default_rng(8), n=4, size=32)
    options = steps.StepOptions.from_config(config)
    assert options.deep_supervision == 1
    images, masks, _ = steps.preprocess(batch, 32, options.normalize)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, updates = state.apply_fn(
        variables, images, train=True, mutable=["batch_stats", "intermediates"]
    )
    head = np.asarray(updates["intermediates"]["deep_supervision_1"][0], np.float64)[:3]
    t0 = np.asarray(masks, np.float64)[:3]  # the 4th example is padding
    t1 = t0.reshape(3, 16, 2, 16, 2, 1).mean(axis=(2, 4)) >= 0.5

    def bce_dice(logit, t, smooth=100.0):
        p = 1 / (1 + np.exp(-logit))
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
        return bce - (2 * np.sum(t * p) + smooth) / (np.sum(t) + np.sum(p) + smooth)

    level0 = bce_dice(np.asarray(logits, np.float64)[:3], t0)
    expected = (level0 + bce_dice(head, t1.astype(np.float64), smooth=25.0) / 2) / 1.5
    new_state, out = train.train_step(state, batch, jax.random.key(1), options)
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-4)
    assert abs(float(out["loss"]) - level0) > 1e-3
    before = state.params["DeepSupervision_1"]["kernel"]
    assert np.abs(np.asarray(new_state.params["DeepSupervision_1"]["kernel"] - before)).max() > 0
    evaluated = steps.eval_step(state, batch, options)
    probs = steps.probabilities(state, steps.normalized(batch, options.normalize), 32, False)
    p = np.clip(np.asarray(probs, np.float64)[:3], 1e-7, 1 - 1e-7)
    np.testing.assert_allclose(evaluated["loss"], bce_dice(np.log(p / (1 - p)), t0), rtol=1e-4)
