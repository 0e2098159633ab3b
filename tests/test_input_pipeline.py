"""Epoch plans and grain iteration: every example exactly once, padding marked invalid."""

import numpy as np
import pytest

from lggunet import input_pipeline


@pytest.mark.parametrize("n,batch", [(10, 4), (12, 4), (3, 8), (1, 1)])
def test_eval_plan_covers_every_example_once(n, batch):
    plan = input_pipeline.epoch_plan(n, batch, shuffle=False)
    assert plan.indices.shape == (-(-n // batch), batch)
    np.testing.assert_array_equal(plan.indices[plan.valid], np.arange(n))
    assert plan.valid.sum() == n


def test_shuffled_plan_is_a_permutation_per_epoch():
    a = input_pipeline.epoch_plan(50, 8, shuffle=True, seed=3, epoch=1)
    b = input_pipeline.epoch_plan(50, 8, shuffle=True, seed=3, epoch=1)
    c = input_pipeline.epoch_plan(50, 8, shuffle=True, seed=3, epoch=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert sorted(a.indices[a.valid].tolist()) == list(range(50))
    assert not np.array_equal(a.indices[a.valid], c.indices[c.valid])


def test_shards_are_disjoint_and_cover_the_split():
    plans = [
        input_pipeline.epoch_plan(
            23, 4, shuffle=True, seed=0, epoch=0, shard_index=i, shard_count=3
        )
        for i in range(3)
    ]
    assert len({len(p) for p in plans}) == 1  # hosts stay in step
    seen = [p.indices[p.valid].tolist() for p in plans]
    assert sorted(sum(seen, [])) == list(range(23))


def test_iterate_reads_planned_batches_with_padding():
    source = [
        {
            "image": np.full((4, 4, 3), i, np.uint8),
            "mask": np.full((4, 4, 1), i % 2, np.uint8),
            "patient_id": f"p{i // 3}".encode(),
            "slice_index": i,
            "tumour_area": 16 * (i % 2),
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
        }
        for i in range(7)
    ]
    plan = input_pipeline.epoch_plan(7, 3, shuffle=False)
    batches = list(input_pipeline.iterate(source, plan, num_threads=2))
    assert len(batches) == 3
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [True, False, False])
    assert last["image"].shape == (3, 4, 4, 3) and last["image"].dtype == np.uint8
    got = np.concatenate([b["slice_index"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(got, np.arange(7))
    assert batches[0]["patient_id"].tolist() == ["p0", "p0", "p0"]
    for b in batches:
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["slice_index"])
    resumed = list(input_pipeline.iterate(source, plan, start=2))
    np.testing.assert_array_equal(resumed[0]["slice_index"], last["slice_index"])
    # Worker processes give the same batches, absl flags parsed or not.
    in_workers = list(input_pipeline.iterate(source, plan, num_workers=2))
    for a, b in zip(batches, in_workers, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_oversampling_repeats_tumour_slices():
    areas = np.array([0, 5, 0, 12, 0, 0, 3, 0])
    np.testing.assert_array_equal(
        input_pipeline.oversampling_repeats(areas, 1.0, seed=0, epoch=0), np.ones(8)
    )
    np.testing.assert_array_equal(
        input_pipeline.oversampling_repeats(areas, 3.0, seed=0, epoch=0), [1, 3, 1, 3, 1, 1, 3, 1]
    )
    # A fractional factor: on average 2.5 per tumour slice over many epochs.
    many = np.array(
        [input_pipeline.oversampling_repeats(areas, 2.5, seed=0, epoch=e) for e in range(400)]
    )
    assert set(np.unique(many[:, [1, 3, 6]]).tolist()) == {2, 3}
    assert abs(many[:, [1, 3, 6]].mean() - 2.5) < 0.05
    assert (many[:, [0, 2, 4, 5, 7]] == 1).all()
    repeats = input_pipeline.oversampling_repeats(areas, 3.0, seed=0, epoch=0)
    plan = input_pipeline.epoch_plan(8, 4, shuffle=True, seed=0, epoch=0, repeats=repeats)
    counts = np.bincount(plan.indices[plan.valid], minlength=8)
    np.testing.assert_array_equal(counts, repeats)


def test_device_cache_gives_the_same_batches_as_grain():
    rng = np.random.default_rng(0)
    source = [
        {
            "image": rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
            "mask": rng.integers(0, 2, (4, 4, 1), dtype=np.uint8),
            "patient_id": f"p{i // 4}".encode(),
            "slice_index": i,
            "tumour_area": i % 3,
            "volume_mean": np.full(3, i, np.float32),
            "volume_std": np.full(3, i + 1, np.float32),
        }
        for i in range(11)
    ]
    cache = input_pipeline.DeviceCache(source)
    assert len(cache) == 11
    plan = input_pipeline.epoch_plan(11, 4, shuffle=True, seed=1, epoch=2)
    from_grain = list(input_pipeline.prefetch_to_device(input_pipeline.iterate(source, plan)))
    from_cache = list(cache.iterate(plan))
    assert len(from_grain) == len(from_cache) == 3
    for a, b in zip(from_grain, from_cache, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
