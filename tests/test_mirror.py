"""Mirror input (`model.mirror_input`): the network fed each image beside its left-right
mirror, the pair built before augmentation so that a rotation moves both halves alike."""

import dataclasses

import jax
import numpy as np
import pytest

import lggunet
from lggunet import augment, configuration, losses, models, report, steps, train
from lggunet.intensity import IntensityParams
from lggunet.models import UNet
from tests.helpers.tiny import fresh_state
from tests.test_preprocess import make_batch

OFF = IntensityParams(
    **{f.name: 0.0 for f in dataclasses.fields(IntensityParams) if f.name.endswith("_p")}
)


def numpy_pair(x: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W, 2C): the images, then their left-right mirrors."""
    x = np.asarray(x)
    return np.concatenate([x, x[:, :, ::-1]], axis=-1)


def test_a_mirror_model_is_the_unet_on_the_numpy_pair():
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    model = UNet(features=4, depth=2, mirror_input=True)
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["ConvBlock_0"]["Conv_0"]["kernel"].shape == (3, 3, 6, 4)
    expected = UNet(features=4, depth=2).apply(variables, numpy_pair(x))
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-6, atol=1e-6)
    given = model.apply(variables, numpy_pair(x), mirrored=True)
    np.testing.assert_allclose(given, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="without mirror_input"):
        UNet(features=4, depth=2).apply(variables, numpy_pair(x), mirrored=True)
    # Not left-right symmetric: the mirror of an image is a different input.
    flipped = model.apply(variables, x[:, :, ::-1])[:, :, ::-1]
    assert np.abs(np.asarray(flipped) - np.asarray(expected)).max() > 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_both_halves_of_the_pair_get_the_same_warp_and_flip(seed):
    x = np.random.default_rng(seed).normal(size=(24, 24, 3)).astype(np.float32)
    mask = np.zeros((24, 24, 1), np.float32)
    params = augment.AugmentParams(rotation_range=30.0, zoom_range=0.1, horizontal_flip=True)
    key = jax.random.key(seed)
    out, _ = augment.augment_example(key, models.with_mirror(x[None])[0], mask, params)
    first, _ = augment.augment_example(key, x, mask, params)
    second, _ = augment.augment_example(key, x[:, ::-1], mask, params)
    np.testing.assert_allclose(out[..., :3], first, atol=1e-5)
    np.testing.assert_allclose(out[..., 3:], second, atol=1e-5)


def test_both_halves_of_the_pair_get_the_same_intensity_transforms():
    """Brightness, scale, contrast, gamma and a channel copied over another, without noise
    (each half draws its own): the second half stays the first's mirror image."""
    x = np.random.default_rng(3).uniform(0, 2, size=(20, 20, 3)).astype(np.float32)
    mask = np.zeros((20, 20, 1), np.float32)
    shading = dataclasses.replace(
        OFF, brightness_p=1.0, scale_p=1.0, contrast_p=1.0, gamma_p=1.0, channel_replace_p=1.0
    )
    params = augment.AugmentParams(intensity=shading)
    out, _ = augment.augment_example(jax.random.key(5), numpy_pair(x[None])[0], mask, params)
    out = np.asarray(out)
    assert np.abs(out[..., :3] - x).max() > 1e-2  # the transforms did change the image
    np.testing.assert_allclose(out[..., 3:], out[:, ::-1, :3], rtol=1e-5, atol=1e-5)


def test_train_step_warps_the_pair_before_the_network_sees_it(tiny_config):
    """The step's loss is the network on the NumPy pair augmented as one 6-channel image;
    mirroring after the rotation (inside the network) would give another loss."""
    config = tiny_config
    config.model.mirror_input = True
    config.augment.preset = "buda2019"
    state = fresh_state(config)
    options = steps.StepOptions.from_config(config)
    assert options.mirror_input and options.augment.rotation_range == 15.0
    batch = make_batch(np.random.default_rng(4), n=3, size=32)
    rng = jax.random.key(1)
    _, out = train.train_step(state, batch, rng, options)

    images, masks, weights = steps.preprocess(batch, 32, options.normalize)
    augment_rng, _ = jax.random.split(rng)
    pair, warped_masks = augment.augment_batch(
        augment_rng, numpy_pair(images), masks, options.augment
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    loss_fn = losses.get_loss(options.loss, options.tversky_beta)

    def loss(x, mirrored):
        logits, _ = state.apply_fn(
            variables, x, train=True, mirrored=mirrored, mutable=["batch_stats"]
        )
        return float(loss_fn(logits, warped_masks, weights))

    assert float(out["loss"]) == pytest.approx(loss(pair, True), rel=1e-5)
    assert abs(loss(pair[..., :3], False) - loss(pair, True)) > 1e-5


def test_a_mirror_run_trains_and_predicts_with_the_pair(tiny_config, tmp_path):
    """The loaded model of a mirror run applies the plain U-Net to the NumPy pair, and
    --mode=evaluate reproduces the run's final test scores."""
    config = tiny_config
    config.data.phantom = True
    config.model.mirror_input = True
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    model = lggunet.load_model(str(workdir))
    volume = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    plain = UNet(features=config.model.features, depth=config.model.depth)
    x = volume.astype(np.float32) / 255
    by_hand = jax.nn.sigmoid(plain.apply(model.variables, numpy_pair(x)))[..., 0]
    assert model.normalize == "scale" and "mirror_input=True" in repr(model)
    assert configuration.describe(config).endswith(", mirror input")
    np.testing.assert_allclose(model(volume), by_hand, atol=1e-5)
    scored = report.evaluate_run(config, workdir, splits=("test",))["splits"]["test"]
    plain_scores = scored["variants"]["plain"]
    assert plain_scores["volume_dice"]["mean"] == pytest.approx(
        final["test"]["volume_dice"], abs=1e-6
    )


def test_configs_leave_the_mirror_off_and_old_configs_read_as_off():
    from lggunet import configuration
    from lggunet.configs import cpu, unet

    assert not unet.get_config().model.mirror_input and not cpu.get_config().model.mirror_input
    old = unet.get_config()
    del old.model["mirror_input"]
    old.config_version = 14
    assert configuration.upgrade(old).model.mirror_input is False


def test_the_fainter_tumour_augmentation_is_refused_beside_the_mirror():
    from lggunet import configuration
    from lggunet.configs import cpu
    from lggunet.errors import ConfigError

    config = cpu.get_config()
    config.model.mirror_input = True
    configuration.check(config)
    config.augment.tumour_contrast_p = 0.3
    with pytest.raises(ConfigError, match="model.mirror_input with augment.tumour_contrast_p"):
        configuration.check(config)


def test_flip_tta_averages_the_pair_and_its_flip():
    """TTA flips the 3-channel slice and the network pairs it: U([x, fx]) and U([fx, x])
    flipped back, averaged (U: the plain U-Net on the NumPy-built pairs)."""
    x = np.random.default_rng(6).normal(size=(2, 16, 16, 3)).astype(np.float32)
    module = UNet(features=4, depth=2, mirror_input=True)
    variables = module.init(jax.random.key(0), x)
    weights = steps.Weights(variables["params"], variables["batch_stats"], module.apply)
    plain = UNet(features=4, depth=2)

    def p(pair):
        return jax.nn.sigmoid(plain.apply(variables, pair))

    fx = x[:, :, ::-1]
    expected = 0.5 * (np.asarray(p(numpy_pair(x))) + np.asarray(p(numpy_pair(fx)))[:, :, ::-1])
    got = steps.probabilities(weights, x, 16, tta=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_mirror_2p5d_model_takes_every_slice_and_its_mirror():
    from lggunet.configs import cpu

    config = cpu.get_config()
    config.model.mirror_input = True
    config.data.context_slices = 1
    shapes = models.abstract_variables(config)
    assert shapes["params"]["ConvBlock_0"]["Conv_0"]["kernel"].shape == (3, 3, 18, 16)


def test_a_mirror_setting_that_is_not_a_boolean_is_refused():
    from lggunet.configs import cpu
    from lggunet.errors import ConfigError

    config = cpu.get_config()
    with config.ignore_type():
        config.model.mirror_input = "false"
    with pytest.raises(ConfigError, match="model.mirror_input='false'"):
        configuration.check(config)
