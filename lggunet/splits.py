"""Train / validation / test assignment: by patient (honest) or by slice (leaky, notebook)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lggunet.errors import ConfigError

SPLITS = ("train", "validation", "test")


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n items by fractions; every split with a positive fraction gets at least one."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"split fractions {tuple(fractions)} must be three non-negative numbers "
            "(train, validation, test) summing to 1"
        )
    wanted = sum(1 for f in fractions if f > 0)
    if n < wanted:
        raise ConfigError(f"{n} items cannot fill {wanted} non-empty splits")
    val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
    train = n - val - test
    if fractions[0] > 0 and train < 1:
        raise ConfigError(f"{n} items leave no training items with fractions {fractions}")
    return [train, val, test]


def split_by_patient(
    patient_ids: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Patient id -> split name. Deterministic in (set of patients, fractions, seed)."""
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train, n_val, _ = _counts(len(patients), fractions)
    names = ["train"] * n_train + ["validation"] * n_val
    names += ["test"] * (len(patients) - len(names))
    return {patients[i]: name for i, name in zip(order, names, strict=True)}


def split_by_slice(num_slices: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split name per slice, at random. LEAKY: a patient's slices land in several splits.

    This only reproduces the Keras notebook's setup (a random slice-level split); numbers
    measured with it overstate how the model does on new patients.
    """
    order = np.random.default_rng(seed).permutation(num_slices)
    n_train, n_val, _ = _counts(num_slices, fractions)
    names = np.empty(num_slices, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_val]] = "validation"
    names[order[n_train + n_val :]] = "test"
    return names.tolist()
