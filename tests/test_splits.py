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


def mixed_patients():
    counts = {"CS": 11, "DU": 16, "FG": 10, "HT": 11, "EZ": 1}
    return [f"TCGA_{inst}_{i:04d}" for inst, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 10])
@pytest.mark.parametrize("seed", range(6))
def test_cv_folds_partition_patients_and_stratify_by_institution(k, seed):
    patients = mixed_patients()
    folds = splits.cv_folds(patients, k, seed=seed)
    assert sorted(folds) == sorted(patients) and set(folds.values()) == set(range(k))
    sizes = [list(folds.values()).count(f) for f in range(k)]
    assert max(sizes) - min(sizes) <= 1  # e.g. 49 patients in 5 folds: 10, 10, 10, 10, 9
    for inst in ("CS", "DU", "FG", "HT"):
        per_fold = [
            sum(1 for p, f in folds.items() if f == fold and splits.institution_of(p) == inst)
            for fold in range(k)
        ]
        assert max(per_fold) - min(per_fold) <= 1, (inst, per_fold)


def test_cv_folds_are_deterministic_and_seeded():
    patients = mixed_patients()
    folds = splits.cv_folds(patients, 5, seed=0)
    assert folds == splits.cv_folds(list(reversed(patients)), 5, seed=0)
    assert folds != splits.cv_folds(patients, 5, seed=1)


def test_each_patient_is_tested_exactly_once_and_never_trained_on_in_its_fold():
    patients = mixed_patients()
    tested = []
    for k in range(5):
        split = splits.split_cross_validation(patients, 5, k, 0.1, seed=3)
        assert sorted(split) == sorted(patients)
        names = list(split.values())
        assert names.count("validation") == 5  # round(0.1 * 49)
        val_institutions = {splits.institution_of(p) for p, s in split.items() if s == "validation"}
        assert len(val_institutions) >= 4  # spread over the institutions
        tested += [p for p, s in split.items() if s == "test"]
    assert sorted(tested) == sorted(patients)


@pytest.mark.parametrize("folds, fold", [(1, 0), (5, 5), (5, -1), (60, 0)])
def test_bad_fold_settings_are_config_errors(folds, fold):
    with pytest.raises(ConfigError, match="fold"):
        splits.split_cross_validation(mixed_patients(), folds, fold, 0.1, seed=0)


def test_cv_without_validation_trains_on_every_patient_outside_the_fold():
    patients = mixed_patients()
    for k in range(5):
        with_val = splits.split_cross_validation(patients, 5, k, 0.1, seed=3)
        split = splits.split_cross_validation(patients, 5, k, 0.0, seed=3)
        assert "validation" not in split.values()
        test = {p for p, s in split.items() if s == "test"}
        assert test == {p for p, s in with_val.items() if s == "test"}  # the same folds
        assert {p for p, s in split.items() if s == "train"} == set(patients) - test


def test_no_validation_split_refuses_what_chooses_by_validation_loss():
    from lggunet.configs import unet

    config = unet.get_config()
    config.data.split_fractions = (0.9, 0.0, 0.1)
    with pytest.raises(ConfigError, match="lr_schedule='plateau', evaluate.checkpoint='best'"):
        splits.check_config(config)
    config.lr_schedule, config.evaluate.checkpoint = "cosine", "last"
    config.early_stopping.patience = 3
    with pytest.raises(ConfigError, match=r"no validation split, but early_stopping.patience=3"):
        splits.check_config(config)
    config.early_stopping.patience = 0
    splits.check_config(config)  # nothing left that needs a validation split
    config.data.split_fractions = (0.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="needs a train split"):
        splits.check_config(config)


def test_too_few_patients_for_the_splits_says_patients_and_the_fractions():
    with pytest.raises(ConfigError, match=r"^2 patients cannot fill 3 non-empty splits \(data"):
        splits.split_by_patient(["TCGA_AA_1", "TCGA_AA_2"], (0.8, 0.1, 0.1), 0)
    with pytest.raises(ConfigError, match=r"^3 slices leave none to train on with data\.split"):
        splits.split_by_slice(3, (0.01, 0.5, 0.49), 0)
