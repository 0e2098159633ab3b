"""Intensity augmentation: each transform against NumPy / SciPy, and the random draws."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from lggunet import augment, intensity
from lggunet.intensity import IntensityParams

OFF = IntensityParams(
    **{f.name: 0.0 for f in dataclasses.fields(IntensityParams) if f.name.endswith("_p")}
)


def image(seed=0, shape=(24, 20, 3)):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def test_blur_matches_scipy_gaussian_filter():
    x = image(1)
    sigma = np.array([0.5, 0.8, 1.0], np.float32)
    ours = intensity.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma))
    ref = np.stack(
        [
            ndimage.gaussian_filter(x[..., c].astype(np.float64), s, mode="nearest", radius=4)
            for c, s in enumerate(sigma)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_contrast_matches_numpy():
    x = image(2)
    f = np.array([0.75, 1.0, 1.25], np.float32)
    mean = x.mean(axis=(0, 1))
    ref = np.clip((x - mean) * f + mean, x.min(axis=(0, 1)), x.max(axis=(0, 1)))
    np.testing.assert_allclose(intensity.contrast(jnp.asarray(x), jnp.asarray(f)), ref, atol=1e-5)


def test_gamma_matches_numpy_and_keeps_mean_and_std():
    x = image(3)
    g = np.array([0.7, 1.0, 1.5], np.float32)
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    span = hi - lo + 1e-7
    y = ((x - lo) / span) ** g * span + lo
    ref = (y - y.mean(axis=(0, 1))) / (y.std(axis=(0, 1)) + 1e-8) * x.std(axis=(0, 1))
    ref += x.mean(axis=(0, 1))
    ours = np.asarray(intensity.gamma(jnp.asarray(x), jnp.asarray(g)))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours.mean(axis=(0, 1)), x.mean(axis=(0, 1)), atol=1e-4)
    np.testing.assert_allclose(ours.std(axis=(0, 1)), x.std(axis=(0, 1)), atol=1e-4)
    assert not np.allclose(ours[..., 0], x[..., 0], atol=1e-2)  # g = 0.7 changed channel 0
    np.testing.assert_allclose(ours[..., 1], x[..., 1], atol=1e-4)  # g = 1 is the identity


def test_replace_channel_copies_one_channel():
    x = image(4)
    out = np.asarray(intensity.replace_channel(jnp.asarray(x), 1, 2))
    np.testing.assert_array_equal(out[..., 0], x[..., 0])
    np.testing.assert_array_equal(out[..., 1], x[..., 1])
    np.testing.assert_array_equal(out[..., 2], x[..., 1])


def test_single_channel_copies_one_channel_everywhere():
    x = image(9)
    out = np.asarray(intensity.single_channel(jnp.asarray(x), 1))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], x[..., 1])


def test_all_probabilities_zero_is_identity_bit_for_bit():
    x = jnp.asarray(np.stack([image(5), image(6)]))
    np.testing.assert_array_equal(intensity.augment_intensity(jax.random.key(0), x, OFF), x)


def test_each_transform_applies_as_drawn():
    """With one transform always on, `apply` equals that transform with the drawn values."""
    x = jnp.asarray(image(7))
    key = jax.random.key(3)
    cases = {
        "brightness_p": lambda t: x * t["brightness_factor"],
        "scale_p": lambda t: x * t["scale_factor"],
        "contrast_p": lambda t: intensity.contrast(x, t["contrast_factor"]),
        "gamma_p": lambda t: intensity.gamma(x, t["gamma_value"]),
        "blur_p": lambda t: intensity.gaussian_blur(x, t["sigma"]),
        "channel_replace_p": lambda t: intensity.replace_channel(x, t["source"], t["target"]),
        "single_channel_p": lambda t: jnp.repeat(x[..., t["single_source"]][..., None], 3, -1),
    }
    for field, expected in cases.items():
        params = dataclasses.replace(OFF, **{field: 1.0})
        t = intensity.draw(key, params)
        np.testing.assert_allclose(intensity.apply(x, t), expected(t), atol=1e-6, err_msg=field)
    t = intensity.draw(key, dataclasses.replace(OFF, noise_p=1.0))
    residual = np.asarray(intensity.apply(x, t) - x)
    assert abs(residual.std() - float(t["noise_std"])) < 0.1 * float(t["noise_std"]) + 1e-3


def test_draw_frequencies_and_ranges():
    keys = jax.random.split(jax.random.key(0), 4000)
    t = jax.vmap(lambda k: intensity.draw(k, IntensityParams()))(keys)
    p = IntensityParams()
    for flag, prob in [
        ("replace", p.channel_replace_p),
        ("single", p.single_channel_p),
        ("noise", p.noise_p),
        ("blur", p.blur_p),
        ("brightness", p.brightness_p),
        ("scale", p.scale_p),
        ("contrast", p.contrast_p),
        ("gamma", p.gamma_p),
    ]:
        rate = float(np.mean(t[flag]))
        assert abs(rate - prob) < 4 * np.sqrt(prob * (1 - prob) / 4000), (flag, rate)
    assert np.all(np.asarray(t["source"]) != np.asarray(t["target"]))
    assert set(np.unique(t["target"]).tolist()) == {0, 1, 2}
    g = np.asarray(t["gamma_value"])
    assert g.min() >= 0.7 and g.max() <= 1.5
    assert abs(float(np.mean(g < 1)) - 0.5) < 0.02  # below 1 half the time (batchgenerators)
    n = np.asarray(t["noise_std"])
    assert n.min() >= 0 and n.max() <= 0.1
    s = np.asarray(t["sigma"])
    assert s.min() >= 0.5 and s.max() <= 1.0


def test_preset_adds_intensity_to_the_spatial_augmentation_and_leaves_masks_alone():
    preset = augment.PRESETS["buda2019_intensity"]
    assert preset.intensity == IntensityParams()
    assert dataclasses.replace(preset, intensity=None) == augment.PRESETS["buda2019"]
    rng = np.random.default_rng(8)
    images = jnp.asarray(rng.normal(0, 1, (16, 16, 16, 3)).astype(np.float32))
    masks = jnp.asarray((rng.random((16, 16, 16, 1)) > 0.7).astype(np.float32))
    key = jax.random.key(1)
    a_img, a_mask = augment.augment_batch(key, images, masks, augment.PRESETS["buda2019"])
    b_img, b_mask = augment.augment_batch(key, images, masks, preset)
    np.testing.assert_array_equal(a_mask, b_mask)  # same spatial transform, mask untouched
    changed = np.any(np.abs(np.asarray(a_img) - np.asarray(b_img)) > 1e-6, axis=(1, 2, 3))
    assert 0 < changed.sum() < 16  # some examples drew an intensity transform, not all


def test_channel_copy_probability_comes_from_the_config():
    """`augment.channel_copy_p` sets both channel-copy transforms, preset or not, and nothing
    else; the default is nnU-Net's 0.1, as before the field existed."""
    from lggunet import steps
    from lggunet.configs import cpu, unet

    assert steps.augment_params(cpu.get_config()) == augment.PRESETS["buda2019_intensity"]
    config = cpu.get_config()
    config.augment.channel_copy_p = 0.4
    params = steps.augment_params(config).intensity
    expected = dataclasses.replace(IntensityParams(), channel_replace_p=0.4, single_channel_p=0.4)
    assert params == expected
    keys = jax.random.split(jax.random.key(3), 4000)
    drawn = jax.vmap(lambda k: intensity.draw(k, params))(keys)
    for flag in ("replace", "single"):
        assert abs(float(np.mean(drawn[flag])) - 0.4) < 0.03
    fields = unet.get_config()  # no preset: the Keras-style fields plus `augment.intensity`
    fields.augment.intensity, fields.augment.channel_copy_p = True, 0.4
    assert steps.augment_params(fields).intensity == expected
    spatial_only = unet.get_config()  # intensity off: the field changes nothing
    spatial_only.augment.channel_copy_p = 0.9
    assert steps.augment_params(spatial_only) == steps.augment_params(unet.get_config())
    assert steps.augment_params(spatial_only).intensity is None


def test_intensity_probability_scale_multiplies_the_other_transforms():
    """`augment.intensity_p_scale` multiplies the probabilities of noise, blur, brightness,
    scaling, contrast and gamma (nnU-Net's 0.1, 0.2, 0.15, 0.15, 0.15, 0.3), capped at 1,
    leaves the channel copies and every range alone, and shows in the drawn frequencies; a
    negative factor is refused."""
    from lggunet import configuration, steps
    from lggunet.configs import cpu, unet
    from lggunet.errors import ConfigError

    config = cpu.get_config()
    config.augment.intensity_p_scale = 2.0
    params = steps.augment_params(config).intensity
    expected = dataclasses.replace(
        IntensityParams(),
        noise_p=0.2,
        blur_p=0.4,
        brightness_p=0.3,
        scale_p=0.3,
        contrast_p=0.3,
        gamma_p=0.6,
    )
    assert params == expected
    keys = jax.random.split(jax.random.key(5), 4000)
    drawn = jax.vmap(lambda k: intensity.draw(k, params))(keys)
    for flag, p in (("gamma", 0.6), ("blur", 0.4), ("noise", 0.2), ("replace", 0.1)):
        assert abs(float(np.mean(drawn[flag])) - p) < 0.03, flag
    config.augment.intensity_p_scale = 3.0
    tripled = steps.augment_params(config).intensity
    assert (tripled.gamma_p, tripled.blur_p) == pytest.approx((0.9, 0.6))  # below the cap
    config.augment.intensity_p_scale = 4.0
    capped = steps.augment_params(config).intensity
    assert (capped.gamma_p, capped.blur_p, capped.noise_p) == pytest.approx((1.0, 0.8, 0.4))
    assert capped.gamma_range == IntensityParams().gamma_range
    fields = unet.get_config()  # no preset: the Keras-style fields plus `augment.intensity`
    fields.augment.intensity, fields.augment.intensity_p_scale = True, 2.0
    assert steps.augment_params(fields).intensity == expected
    spatial_only = unet.get_config()  # intensity off: the factor changes nothing
    spatial_only.augment.intensity_p_scale = 3.0
    assert steps.augment_params(spatial_only) == steps.augment_params(unet.get_config())
    for scale, ok in ((-1.0, False), (0.0, True), (10.0, True), (10.5, False)):
        config.augment.intensity_p_scale = scale
        if ok:
            configuration.check(config)
        else:
            with pytest.raises(ConfigError, match="intensity_p_scale"):
                configuration.check(config)


def _ring_reference(x, mask, factor):
    """NumPy / SciPy: the fainter tumour of `intensity.tumour_contrast`."""
    tumour = mask[..., 0] > 0.5
    r = intensity.ring_radius(x.shape[0])
    near = ndimage.binary_dilation(tumour, structure=np.ones((2 * r + 1, 2 * r + 1), bool))
    tissue = np.any(x > x.min(axis=(0, 1)), axis=-1)
    ring = near & ~tumour & tissue
    if not ring.any() or not tumour.any():
        return x
    ring_mean = x[ring].astype(np.float64).mean(axis=0)
    out = x.astype(np.float64).copy()
    out[tumour] += (1 - factor) * (ring_mean - out[tumour])
    return out


def test_tumour_contrast_hand_computed_case():
    """Tissue at 1, background at -2 (the minimum), a tumour at 3: factors 0.5, 1, 0 give
    2, 3 and 1 on the tumour; nothing else moves, and the background stays out of the ring."""
    x = np.ones((32, 32, 3), np.float32)
    x[:, :6] = -2.0  # background touching the ring on the left
    x[12:18, 8:14] = 3.0
    mask = np.zeros((32, 32, 1), np.float32)
    mask[12:18, 8:14] = 1.0
    out = np.asarray(
        intensity.tumour_contrast(jnp.asarray(x), jnp.asarray(mask), jnp.asarray([0.5, 1, 0]))
    )
    np.testing.assert_allclose(out[12:18, 8:14], np.broadcast_to([2.0, 3.0, 1.0], (6, 6, 3)))
    outside = mask[..., 0] == 0
    np.testing.assert_array_equal(out[outside], x[outside])


def test_tumour_contrast_matches_numpy_and_leaves_slices_without_tumour():
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (40, 36, 3)).astype(np.float32)
    x[:, :5] = x.min(axis=(0, 1))  # a normalised background
    mask = np.zeros((40, 36, 1), np.float32)
    mask[10:22, 4:15, 0] = 1.0  # reaches into the background
    mask[30:33, 25:28, 0] = 0.7  # a soft mask counts above 0.5
    factor = np.array([0.3, 0.8, 0.55], np.float32)
    out = intensity.tumour_contrast(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(factor))
    np.testing.assert_allclose(out, _ring_reference(x, mask, factor), atol=1e-5)
    empty = np.zeros_like(mask)
    same = intensity.tumour_contrast(jnp.asarray(x), jnp.asarray(empty), jnp.asarray(factor))
    np.testing.assert_array_equal(same, x)


def test_tumour_contrast_draws_leave_the_other_draws_as_before():
    """Probability and range as set; the other transforms draw exactly what they drew before
    the fainter tumour existed (off by default, so the shipped recipe is unchanged), and apply
    refuses to run it without the mask."""
    params = IntensityParams(tumour_contrast_p=0.3)
    keys = jax.random.split(jax.random.key(9), 4000)
    drawn = jax.vmap(lambda k: intensity.draw(k, params))(keys)
    assert abs(float(np.mean(drawn["tumour"])) - 0.3) < 0.03
    f = np.asarray(drawn["tumour_factor"])
    assert f.shape == (4000, 3) and f.min() >= 0.3 and f.max() <= 1.0
    assert abs(float(f.mean()) - 0.65) < 0.01
    before = intensity.draw(jax.random.key(4), IntensityParams())
    assert "tumour" not in before
    after = intensity.draw(jax.random.key(4), params)
    for name, value in before.items():
        if name == "noise_key":
            value, other = jax.random.key_data(value), jax.random.key_data(after[name])
        else:
            other = after[name]
        np.testing.assert_array_equal(value, other, err_msg=name)
    on = intensity.draw(jax.random.key(4), dataclasses.replace(OFF, tumour_contrast_p=1.0))
    with pytest.raises(ValueError, match="needs the mask"):
        intensity.apply(jnp.asarray(image(1)), on)


def test_tumour_contrast_from_the_config_changes_only_tumour_pixels():
    """`augment.tumour_contrast_p` reaches the augmentation; with only that transform on,
    the augmented images differ from the spatial augmentation's only under the masks."""
    from lggunet import steps
    from lggunet.configs import cpu

    config = cpu.get_config()
    assert steps.augment_params(config).intensity.tumour_contrast_p == 0.0
    config.augment.tumour_contrast_p = 0.25
    assert steps.augment_params(config).intensity == IntensityParams(tumour_contrast_p=0.25)
    rng = np.random.default_rng(3)
    images = rng.normal(0, 1, (6, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((6, 32, 32, 1), np.float32)
    masks[:, 10:20, 12:22] = 1.0
    masks[5] = 0.0  # a slice without tumour
    spatial = augment.PRESETS["buda2019"]
    faded = dataclasses.replace(spatial, intensity=dataclasses.replace(OFF, tumour_contrast_p=1.0))
    key = jax.random.key(2)
    a_img, a_mask = augment.augment_batch(key, jnp.asarray(images), jnp.asarray(masks), spatial)
    b_img, b_mask = augment.augment_batch(key, jnp.asarray(images), jnp.asarray(masks), faded)
    np.testing.assert_array_equal(a_mask, b_mask)
    changed = np.any(np.asarray(a_img) != np.asarray(b_img), axis=-1)
    assert changed[:5].any() and not changed[5].any()
    assert not np.any(changed & (np.asarray(b_mask)[..., 0] == 0))
