"""2.5D input (data.context_slices): neighbours by hand, stacking against NumPy, augmentation
that treats every slice of the stack as the slice alone, and a run that trains, evaluates and
predicts with it."""

import dataclasses

import jax
import numpy as np
import pytest

import lggunet
from lggunet import (
    augment,
    configuration,
    context,
    dataset,
    input_pipeline,
    normalization,
    predict_files,
    report,
    steps,
    train,
)
from lggunet.errors import DataError, InputError
from lggunet.intensity import IntensityParams


def test_volume_neighbours_by_hand():
    np.testing.assert_array_equal(context.volume_neighbours(4, 1), [[0, 1], [0, 2], [1, 3], [2, 3]])
    np.testing.assert_array_equal(
        context.volume_neighbours(3, 2), [[0, 0, 1, 2], [0, 0, 2, 2], [0, 1, 2, 2]]
    )
    np.testing.assert_array_equal(context.volume_neighbours(1, 1), [[0, 0]])
    assert context.input_channels(0) == 3 and context.input_channels(2) == 15


def test_neighbour_table_follows_slice_numbers_within_each_patient():
    # Patient a's slices 1, 2, 5 in scrambled order (5 follows 2: the nearest it has), b's one.
    ids = ["a", "b", "a", "a"]
    numbers = [5, 7, 1, 2]
    table = input_pipeline.neighbour_table(ids, numbers, 1)
    # a#1 (index 2): itself, a#2; a#2 (3): a#1, a#5; a#5 (0): a#2, itself; b#7: itself twice.
    np.testing.assert_array_equal(table, [[3, 0], [1, 1], [2, 3], [2, 0]])
    with pytest.raises(DataError, match="patient a: slice 2 appears twice"):
        input_pipeline.neighbour_table(["a", "a", "a"], [2, 1, 2], 1)


def _fake_source(num=5):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8)
    ids = ["p", "q"] * (num // 2) + ["p"] * (num % 2)
    numbers = list(range(num))
    return [
        {
            "image": images[i],
            "mask": np.zeros((8, 8, 1), np.uint8),
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
            "tumour_area": 0,
            "patient_id": ids[i].encode(),
            "slice_index": numbers[i],
        }
        for i in range(num)
    ]


def test_context_source_carries_the_neighbours_images():
    source = _fake_source()
    wrapped = input_pipeline.with_context(source, 1)
    assert len(wrapped) == 5
    # p holds examples 0, 2, 4 (slices 0, 2, 4); q holds 1, 3.
    want = {0: [0, 2], 2: [0, 4], 4: [2, 4], 1: [1, 3], 3: [1, 3]}
    for i, neighbours in want.items():
        got = wrapped[i]["context"]
        assert got.shape == (2, 8, 8, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.stack([source[j]["image"] for j in neighbours]))
        np.testing.assert_array_equal(wrapped[i]["image"], source[i]["image"])
    assert "context" not in source[0]  # the source itself is left alone
    assert input_pipeline.with_context(wrapped, 1) is wrapped
    assert input_pipeline.with_context(wrapped, 0) is source
    given = input_pipeline.with_context(source, 1, ["p", "q", "p", "q", "p"], range(5))
    np.testing.assert_array_equal(given.neighbours, wrapped.neighbours)
    # Batches stack it like the other device keys.
    plan = input_pipeline.epoch_plan(5, 4, shuffle=False)
    batch = next(input_pipeline.iterate(wrapped, plan))
    assert batch["context"].shape == (4, 2, 8, 8, 3)
    np.testing.assert_array_equal(batch["context"][2], wrapped[2]["context"])
    assert "context" in input_pipeline.device_batch(batch)


@pytest.mark.parametrize("normalize", ["scale", "zscore_volume", "brain_zscore"])
def test_normalize_stacked_is_each_slice_normalised_alone(normalize):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    neighbours = rng.integers(0, 256, (2, 2, 8, 8, 3)).astype(np.float32)
    mean = rng.uniform(20, 60, (2, 3)).astype(np.float32)
    std = rng.uniform(5, 30, (2, 3)).astype(np.float32)
    brain = np.stack([normalization.brain_statistics(v) for v in (images, images[::-1])])
    stacked = context.normalize_stacked(images, neighbours, normalize, mean, std, brain)
    assert stacked.shape == (2, 8, 8, 9)
    if normalize == "scale":  # by hand
        np.testing.assert_allclose(stacked[..., 3:6], neighbours[:, 0] / 255.0, rtol=1e-6)
        np.testing.assert_allclose(stacked[..., 6:], neighbours[:, 1] / 255.0, rtol=1e-6)
    for g, part in enumerate([images, neighbours[:, 0], neighbours[:, 1]]):
        alone = normalization.normalize_images(part, normalize, mean, std, brain)
        np.testing.assert_array_equal(stacked[..., 3 * g : 3 * g + 3], alone)
    plain = context.normalize_stacked(images, None, normalize, mean, std, brain)
    np.testing.assert_array_equal(plain, stacked[..., :3])


def test_augmentation_gives_every_slice_of_the_stack_the_transform_of_the_slice_alone():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(16, 16, 3)).astype(np.float32)
    mask = (rng.random((16, 16, 1)) > 0.7).astype(np.float32)
    # Every intensity transform but noise always on (noise differs per slice by design).
    always = IntensityParams(
        channel_replace_p=1.0, noise_p=0.0, blur_p=1.0, brightness_p=1.0, scale_p=1.0,
        contrast_p=1.0, gamma_p=1.0,
    )  # fmt: skip
    params = dataclasses.replace(augment.PRESETS["buda2019"], intensity=always)
    stack = np.concatenate([image, image[::-1], image * 0.5], axis=-1)
    for seed in range(3):
        key = jax.random.key(seed)
        out_stack, out_mask = augment.augment_example(key, stack, mask, params)
        for g, part in enumerate([image, image[::-1], image * 0.5]):
            alone, alone_mask = augment.augment_example(key, part, mask, params)
            np.testing.assert_allclose(out_stack[..., 3 * g : 3 * g + 3], alone, atol=1e-5)
            np.testing.assert_array_equal(out_mask, alone_mask)
    # With noise on, each slice draws its own.
    noisy = dataclasses.replace(params, intensity=IntensityParams(noise_p=1.0, noise_std=(1, 1)))
    same = np.concatenate([image, image], axis=-1)
    out, _ = augment.augment_example(jax.random.key(0), same, mask, noisy)
    assert not np.allclose(out[..., :3], out[..., 3:])


def test_a_25d_run_trains_evaluates_and_predicts(tiny_config, tmp_path):
    config = tiny_config
    config.data.phantom = True
    config.data.context_slices = 1
    config.augment.preset = "buda2019_intensity"
    config.data.normalize = "brain_zscore"
    workdir = tmp_path / "run"
    final = train.train_and_evaluate(config, str(workdir))
    model = lggunet.load_model(str(workdir))
    assert model.context_slices == 1
    kernel = jax.tree.leaves(model.variables["params"])
    assert any(leaf.ndim == 4 and leaf.shape[2] == 9 for leaf in kernel)  # the first conv
    # Prediction on a volume: each slice with the slices beside it, as the steps stack them.
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    brain = normalization.brain_statistics(volume)
    probs = model(volume)
    table = context.volume_neighbours(5, 1)
    x = context.normalize_stacked(
        volume.astype(np.float32), volume[table], model.normalize, brain_stats=np.stack([brain] * 5)
    )
    want = steps.probabilities(model.weights, x, model.image_size, model.tta)[..., 0]
    np.testing.assert_allclose(probs, want, atol=1e-5)
    with pytest.raises(InputError, match="give it the"):
        model(volume[0])  # one slice has no neighbours to read
    # A patient's examples in the prepared data, stacked as training and evaluation stack
    # them, are the network input that Model builds from the patient's volume.
    source = dataset.prepare(config.data).as_data_source()["test"]
    wrapped = input_pipeline.with_context(source, 1)
    pid = wrapped[0]["patient_id"]
    mine = [i for i in range(len(wrapped)) if wrapped[i]["patient_id"] == pid]
    mine.sort(key=lambda i: wrapped[i]["slice_index"])
    plan = input_pipeline.EpochPlan(np.array([mine]), np.ones((1, len(mine)), bool))
    batch = next(input_pipeline.iterate(wrapped, plan))
    stacked = steps.normalized(input_pipeline.device_batch(batch), model.normalize)
    volume = batch["image"]
    neighbours = volume[context.volume_neighbours(len(mine), 1)]
    by_hand = context.normalize_stacked(
        volume, neighbours, model.normalize, brain_stats=batch["brain_stats"]
    )
    np.testing.assert_array_equal(stacked, by_hand)
    # --mode=evaluate stacks the neighbours as training's final evaluation did: same scores.
    scored = report.evaluate_run(config, workdir, splits=("test",))["splits"]["test"]
    plain = scored["variants"]["plain"]
    assert plain["volume_dice"]["mean"] == pytest.approx(final["test"]["volume_dice"], abs=1e-6)
    assert scored["notebook"]["plain"]["loss"] == pytest.approx(final["test"]["loss"], rel=1e-5)
    # From files: a volume with a gap is refused (its slices' neighbours are unknown), a whole
    # one predicted.
    from tests.conftest import write_case

    inputs = tmp_path / "in"
    write_case(inputs, "TCGA_CS_0001_20000101", 3)
    write_case(inputs, "TCGA_CS_0002_20000101", 4)
    for name in ("TCGA_CS_0002_20000101_3.tif", "TCGA_CS_0002_20000101_3_mask.tif"):
        (inputs / "TCGA_CS_0002_20000101" / name).unlink()
    result = predict_files.predict_path(model, inputs, tmp_path / "out")
    assert result.failures == [
        "TCGA_CS_0002_20000101: slice(s) 3 missing between 1 and 4, and the 2.5D model "
        "(context_slices=1) needs every slice in order: not predicted"
    ]
    assert result.masks_written == 3


def test_25d_config_checks(tmp_path):
    import ml_collections

    from lggunet.configs import unet

    config = unet.get_config()
    config.data.context_slices = 1
    config.data.split_mode = "slice"
    with pytest.raises(configuration.ConfigError, match="separates a slice from its neighbours"):
        configuration.check(config)
    tree = unet.get_config().to_dict()
    tree["data"]["context_slices"] = 1.5  # as a hand-edited config.json could say
    with pytest.raises(configuration.ConfigError, match="context_slices=1.5 must be a whole"):
        configuration.check_saved(ml_collections.ConfigDict(tree), tmp_path / "config.json")


def test_the_device_cache_gathers_the_same_context_as_grain():
    wrapped = input_pipeline.with_context(_fake_source(7), 1)
    cache = input_pipeline.DeviceCache(wrapped, num_threads=1)
    plan = input_pipeline.epoch_plan(7, 3, shuffle=True, seed=4)
    for cached, read in zip(
        cache.iterate(plan), input_pipeline.iterate(wrapped, plan), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(cached["context"]), read["context"])
    assert "context" not in cache.device  # held once: the neighbours are gathered per batch
