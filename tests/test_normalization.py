"""brain_zscore: statistics over the brain only, checked against a NumPy reference and against
the scanner differences it must undo (constant background, dark scans, copied channels)."""

import numpy as np
import pytest

from lggunet import inference, models, normalization, steps
from tests.helpers.tiny import fresh_state


def phantom_volume(rng, n=6, size=48, background=(0, 0, 0), gain=(1.0, 1.0, 1.0)):
    """A disc of 'brain' (values ~ N(100, 15) per channel, a brighter lesion) on a constant
    background; the brain is scaled per channel by `gain` (a darker or brighter scanner)."""
    yy, xx = np.mgrid[:size, :size]
    brain = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.35 * size) ** 2
    lesion = (yy - size / 2) ** 2 + (xx - size / 2 - 4) ** 2 < (0.1 * size) ** 2
    vol = np.empty((n, size, size, 3), np.float64)
    for c in range(3):
        tissue = rng.normal(100, 15, (n, size, size)) + 60 * lesion
        vol[..., c] = np.where(brain, gain[c] * tissue, background[c])
    return np.clip(np.round(vol), 0, 255).astype(np.uint8), brain


def reference(volume: np.ndarray) -> np.ndarray:
    """The module docstring's recipe, written out independently."""
    v = volume.astype(np.float64)
    frame = np.concatenate(
        [v[:, :4].reshape(-1, 3), v[:, -4:].reshape(-1, 3)]
        + [v[:, :, :4].reshape(-1, 3), v[:, :, -4:].reshape(-1, 3)]
    )
    bg = np.median(frame, axis=0)
    dist = np.abs(v - bg).max(axis=-1)
    thr = max(0.1 * np.percentile(dist, 99), 1.0)
    fg = dist > thr
    out = np.empty_like(v)
    for c in range(3):
        x = v[..., c]
        lo, hi = np.percentile(x[fg], [0.5, 99.5])
        clipped = np.clip(x[fg], lo, hi)
        mean, std = clipped.mean(), max(clipped.std(), 1.0)
        out[..., c] = np.where(fg, (np.clip(x, lo, hi) - mean) / std, (lo - mean) / std)
    return out


def normalized(volume):
    stats = normalization.brain_statistics(volume)
    batch = np.broadcast_to(stats, (len(volume), 6, 3))
    return np.asarray(normalization.normalize_images(volume, "brain_zscore", brain_stats=batch))


def test_brain_zscore_matches_numpy_reference():
    volume, _ = phantom_volume(np.random.default_rng(0), background=(76, 3, 0))
    np.testing.assert_allclose(normalized(volume), reference(volume), atol=2e-4)


def test_brain_pixels_have_zero_mean_unit_std_per_channel():
    volume, brain = phantom_volume(np.random.default_rng(1))
    z = normalized(volume)
    inside = z[np.broadcast_to(brain, z.shape[:3])]
    np.testing.assert_allclose(inside.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose(inside.std(axis=0), 1.0, atol=0.05)


@pytest.mark.parametrize(
    "background, gain",
    [((76, 0, 0), (1, 1, 1)), ((103, 5, 2), (1, 1, 1)), ((0, 0, 0), (0.3, 0.3, 0.3))],
    ids=["background-76", "background-103", "dark-scan"],
)
def test_background_and_brightness_do_not_change_the_input(background, gain):
    """The same anatomy from a scanner with a constant non-zero background, or one that writes
    everything at a third of the brightness, gives (nearly) the same network input."""
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    plain, brain = phantom_volume(rng_a)
    other, _ = phantom_volume(rng_b, background=background, gain=gain)
    a, b = normalized(plain), normalized(other)
    # dark scans lose precision to uint8 rounding (a step of 1 is 1/(0.3*15) std): 0.15
    assert np.abs(a - b)[np.broadcast_to(brain, a.shape[:3])].mean() < 0.15
    np.testing.assert_allclose(a[:, :2, :2], b[:, :2, :2], atol=0.2)  # background: darkest brain


def test_zscore_volume_is_defeated_by_a_constant_background():
    """Why brain_zscore exists: the old whole-volume z-score moves the same brain by far."""
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    plain, brain = phantom_volume(rng_a)
    other, _ = phantom_volume(rng_b, background=(76, 0, 0))

    def zscore(v):
        mean, std = v.reshape(-1, 3).mean(0), v.reshape(-1, 3).std(0)
        return (v - mean) / std

    shift = np.abs(zscore(plain) - zscore(other))[..., 0][np.broadcast_to(brain, plain.shape[:3])]
    assert shift.mean() > 0.5  # brain_zscore: < 0.15 (the test above)


def test_blank_and_single_channel_volumes_stay_finite():
    blank = np.zeros((2, 32, 32, 3), np.uint8)
    assert np.isfinite(normalized(blank)).all()
    volume, _ = phantom_volume(np.random.default_rng(4))
    copied = np.repeat(volume[..., 1:2], 3, axis=-1)  # a missing modality replaced by FLAIR
    z = normalized(copied)
    np.testing.assert_allclose(z[..., 0], z[..., 2], atol=1e-6)
    np.testing.assert_allclose(z[..., 0], z[..., 1], atol=1e-6)


def test_statistics_accept_slices_of_different_sizes():
    rng = np.random.default_rng(5)
    small, _ = phantom_volume(rng, n=2, size=32)
    large, _ = phantom_volume(rng, n=2, size=48)
    stats = normalization.brain_statistics([*small, *large])
    assert stats.shape == (6, 3) and np.isfinite(stats).all()
    with pytest.raises(ValueError, match="slices must be"):
        normalization.brain_statistics([np.zeros((8, 8), np.uint8)])


def test_preprocess_and_model_apply_the_same_normalisation(tiny_config):
    """Training's preprocess and inference's Model give the network the same input."""
    volume, _ = phantom_volume(np.random.default_rng(6), n=4, size=32, background=(76, 0, 0))
    stats = np.broadcast_to(normalization.brain_statistics(volume), (4, 6, 3))
    batch = {
        "image": volume,
        "mask": np.zeros((4, 32, 32, 1), np.uint8),
        "valid": np.ones(4, bool),
        "brain_stats": stats,
    }
    x, _, _ = steps.preprocess(batch, 32, "brain_zscore")
    np.testing.assert_allclose(x, reference(volume), atol=2e-4)

    config = tiny_config
    config.data.image_size = 32
    config.data.normalize = "brain_zscore"
    state = fresh_state(config)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    model = inference.Model(
        module=models.create(config),
        variables=variables,
        image_size=32,
        normalize="brain_zscore",
        batch_size=4,
    )
    logits = model.module.apply(variables, x, train=False)
    expected = 1 / (1 + np.exp(-np.asarray(logits, np.float64)[..., 0]))
    np.testing.assert_allclose(model(volume), expected, atol=1e-5)  # stats from the volume
    assert isinstance(model.module, models.UNet)
