"""Patient and slice splits: disjoint, complete, deterministic, sized by the fractions."""

import pytest

from lggunet import splits
from lggunet.errors import ConfigError

PATIENTS = [f"TCGA_XX_{i:04d}" for i in range(29)]


def test_patient_split_sizes_and_determinism():
    a = splits.split_by_patient(PATIENTS, (0.8, 0.1, 0.1), seed=0)
    assert sorted(a) == sorted(PATIENTS)
    sizes = {name: sum(1 for v in a.values() if v == name) for name in splits.SPLITS}
    assert sizes == {"train": 23, "validation": 3, "test": 3}  # round(2.9) = 3 each
    assert a == splits.split_by_patient(list(reversed(PATIENTS)), (0.8, 0.1, 0.1), seed=0)
    assert a != splits.split_by_patient(PATIENTS, (0.8, 0.1, 0.1), seed=1)


def test_small_splits_get_at_least_one_patient():
    a = splits.split_by_patient(PATIENTS[:4], (0.9, 0.05, 0.05), seed=0)
    assert sorted(a.values()) == ["test", "train", "train", "validation"]


def test_zero_fraction_leaves_split_empty():
    a = splits.split_by_patient(PATIENTS[:10], (0.9, 0.1, 0.0), seed=0)
    assert "test" not in a.values() and list(a.values()).count("validation") == 1


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.2), (0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_config_errors(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        splits.split_by_patient(PATIENTS, fractions, seed=0)


def test_slice_split_counts():
    names = splits.split_by_slice(100, (0.8, 0.1, 0.1), seed=0)
    assert [names.count(s) for s in splits.SPLITS] == [80, 10, 10]
    assert names == splits.split_by_slice(100, (0.8, 0.1, 0.1), seed=0)
