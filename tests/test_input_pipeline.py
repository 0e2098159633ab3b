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
