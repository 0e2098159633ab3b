"""The Python API refuses arrays it cannot use, saying what it expected, and takes a float
image only with its scale said."""

from __future__ import annotations

import numpy as np
import pytest

import lggunet
from lggunet import inference, models
from lggunet.errors import InputError, LggUnetError
from tests.helpers.tiny import fresh_state


@pytest.fixture(scope="module")
def model():
    from tests.helpers.tiny import tiny_config

    config = tiny_config()
    state = fresh_state(config)
    return inference.Model(
        module=models.create(config),
        variables={"params": state.params, "batch_stats": state.batch_stats},
        image_size=config.data.image_size,
        normalize=config.data.normalize,
        batch_size=4,
    )


RNG = np.random.default_rng(0)
UINT8 = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)

BAD = {
    "float in [0, 1] without scale": (UINT8 / 255.0, {}, "say their scale, scale=255"),
    "uint16 beyond 255": (UINT8.astype(np.uint16) * 16, {}, "range over 0..4080"),
    "NaN": (np.where(UINT8 == 7, np.nan, UINT8).astype(np.float32), {"scale": 1}, "NaN"),
    "infinity": (np.full((1, 8, 8, 3), np.inf, np.float32), {"scale": 1}, "NaN or infinite"),
    "negative": (UINT8.astype(np.int16) - 300, {}, "range over -300"),
    "empty batch": (np.zeros((0, 32, 32, 3), np.uint8), {}, "hold no pixels"),
    "zero-size slice": (np.zeros((2, 0, 32, 3), np.uint8), {}, "hold no pixels"),
    "channels first": (np.moveaxis(UINT8, -1, 1), {}, "channels first? move them last"),
    "one channel": (UINT8[..., :1], {}, "expected (N, H, W, 3) or (H, W, 3)"),
    "5-D": (UINT8[None], {}, "expected (N, H, W, 3)"),
    "bool": (UINT8 > 100, {}, "dtype bool"),
    "strings": (np.array([["a"]]), {}, "dtype <U1"),
    "scale that overshoots": (UINT8, {"scale": 255}, "after scaling"),
    "scale that underflows": (UINT8 / 255.0, {"scale": 1e-46}, "the scale is likely wrong"),
    # 1e300 * 1e-300 is 1, computed in float64 (not NaN as in float32): then too dark to be
    # a 0..255 image.
    "overflow times underflow": (np.full((1, 8, 8, 3), 1e300), {"scale": 1e-300}, "wrong"),
    "masked array": (np.ma.masked_array(UINT8, UINT8 > 200), {}, "fill the masked pixels"),
    "ragged list": ([UINT8[0], UINT8[1, :16]], {}, "give slices of one size"),
    "float in [0, 1] said to be 0..255": (UINT8 / 255.0, {"scale": 1}, "scale is likely wrong"),
    "volume_mean of 5": (UINT8, {"volume_mean": np.zeros(5)}, "volume_mean of shape (5,)"),
    "brain_stats of (2, 2)": (UINT8, {"brain_stats": np.zeros((2, 2))}, "expected (6, 3)"),
    "NaN volume_std": (UINT8, {"volume_std": np.full(3, np.nan)}, "volume_std holds NaN"),
    "negative volume_std": (UINT8, {"volume_std": -np.ones(3)}, "must not be negative"),
    "zero std in brain_stats": (UINT8, {"brain_stats": np.zeros((6, 3))}, "std row (5)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arrays_are_input_errors_that_say_what_was_expected(model, case):
    images, kwargs, expected = BAD[case]
    with pytest.raises(InputError) as e:
        lggunet.predict(images, model, **kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, LggUnetError)


def test_accepted_arrays_give_the_same_masks(model):
    reference = lggunet.predict(UINT8, model)
    assert reference.shape == (2, 32, 32) and reference.dtype == np.uint8
    np.testing.assert_array_equal(lggunet.predict(UINT8.astype(np.int64), model), reference)
    np.testing.assert_array_equal(
        lggunet.predict(UINT8.astype(np.float64), model, scale=1), reference
    )
    np.testing.assert_array_equal(lggunet.predict(UINT8[0], model), reference[0])  # one slice
    probs = model(UINT8)
    from_unit = model(UINT8 / np.float32(255), scale=255)
    np.testing.assert_allclose(from_unit, probs, atol=1e-5)


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.1, float("nan"), "0.5", True])
def test_threshold_must_be_a_probability(model, threshold):
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        lggunet.predict(UINT8, model, threshold=threshold)


def test_numpy_scalars_are_numbers(model):
    reference = lggunet.predict(UINT8, model)
    for threshold in (np.float32(0.5), np.float64(0.5), np.array(0.5)):
        np.testing.assert_array_equal(lggunet.predict(UINT8, model, threshold=threshold), reference)
    np.testing.assert_array_equal(
        lggunet.predict(UINT8.astype(np.float32), model, scale=np.int64(1)), reference
    )
    probs = model(UINT8 / np.float32(255), scale=np.array(255.0))
    np.testing.assert_allclose(probs, model(UINT8), atol=1e-5)


@pytest.mark.parametrize("scale", [0, -255, float("nan"), float("inf"), "255"])
def test_scale_must_be_a_positive_number(model, scale):
    with pytest.raises(InputError, match="must be a positive number"):
        lggunet.predict(UINT8 / 255.0, model, scale=scale)


def test_ensemble_checks_once_and_passes_the_scale_on(model):
    ensemble = inference.Ensemble([model, model])
    np.testing.assert_allclose(
        ensemble(UINT8 / np.float32(255), scale=255), model(UINT8), atol=1e-5
    )
    with pytest.raises(InputError, match="say their scale"):
        ensemble(UINT8 / 255.0)
