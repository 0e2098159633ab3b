"""Train / validation / test assignment: by patient (honest) or by slice (leaky, notebook)."""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from lggunet.errors import ConfigError

SPLITS = ("train", "validation", "test")
SPLIT_MODES = ("patient", "slice")  # `data.split_mode`


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """`data.split_fractions` as three numbers, or a ConfigError naming the field."""
    fractions = tuple(fractions)
    numeric = all(
        isinstance(f, int | float) and not isinstance(f, bool) and f == f for f in fractions
    )
    if not numeric or len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"data.split_fractions={fractions} must be (train, validation, test), "
            "non-negative, summing to 1"
        )
    return fractions


def _counts(n: int, fractions: Sequence[float], what: str = "items") -> list[int]:
    """Split n items by fractions; every split with a positive fraction gets at least one."""
    fractions = check_fractions(fractions)
    wanted = sum(1 for f in fractions if f > 0)
    if n < wanted:
        raise ConfigError(
            f"{n} {what} cannot fill {wanted} non-empty splits (data.split_fractions="
            f"{tuple(fractions)}): add {what} or give a split the fraction 0"
        )
    val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
    train = n - val - test
    if fractions[0] > 0 and train < 1:
        raise ConfigError(
            f"{n} {what} leave none to train on with data.split_fractions={tuple(fractions)}"
        )
    return [train, val, test]


def split_by_patient(
    patient_ids: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Patient id -> split name. Deterministic in (set of patients, fractions, seed)."""
    patients = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train, n_val, _ = _counts(len(patients), fractions, "patients")
    names = ["train"] * n_train + ["validation"] * n_val
    names += ["test"] * (len(patients) - len(names))
    return {patients[i]: name for i, name in zip(order, names, strict=True)}


def split_by_slice(num_slices: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split name per slice, at random. LEAKY: a patient's slices land in several splits.

    This only reproduces the Keras notebook's setup (a random slice-level split); numbers
    measured with it overstate how the model does on new patients.
    """
    order = np.random.default_rng(seed).permutation(num_slices)
    n_train, n_val, _ = _counts(num_slices, fractions, "slices")
    names = np.empty(num_slices, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_val]] = "validation"
    names[order[n_train + n_val :]] = "test"
    return names.tolist()


def institution_of(patient_id: str) -> str:
    """The TCGA institution code of a patient id ("TCGA_CS_4941" -> "CS"); "" if none."""
    parts = patient_id.split("_")
    return parts[1] if len(parts) > 2 else ""


def _interleaved_by_institution(patients: Sequence[str], rng: np.random.Generator) -> list[str]:
    """The patients shuffled within each institution, then dealt one institution at a time
    (institutions in random order), so any prefix spreads over the institutions."""
    groups: dict[str, list[str]] = {}
    for p in sorted(patients):
        groups.setdefault(institution_of(p), []).append(p)
    names = sorted(groups)
    for name in names:
        groups[name] = [groups[name][i] for i in rng.permutation(len(groups[name]))]
    names = [names[i] for i in rng.permutation(len(names))]
    longest = max(len(g) for g in groups.values())
    return [groups[n][i] for i in range(longest) for n in names if i < len(groups[n])]


def cv_folds(patient_ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold in [0, folds), stratified by institution: the patients, shuffled
    within each institution and listed one institution after another, are dealt to the folds
    in turn, so every fold gets a near-equal share (within one) of every institution and of
    the whole. Deterministic in (set of patients, folds, seed)."""
    patients = sorted(set(patient_ids))
    if folds < 2 or folds > len(patients):
        raise ConfigError(f"{len(patients)} patients cannot make {folds} folds (need 2..N)")
    rng = np.random.default_rng([seed, folds])
    groups: dict[str, list[str]] = {}
    for p in patients:
        groups.setdefault(institution_of(p), []).append(p)
    order = []
    for name in sorted(groups):
        order += [groups[name][i] for i in rng.permutation(len(groups[name]))]
    offset = int(rng.integers(folds))  # which fold the first patient goes to
    return {p: (i + offset) % folds for i, p in enumerate(order)}


def split_cross_validation(
    patient_ids: Sequence[str], folds: int, fold: int, val_fraction: float, seed: int
) -> dict[str, str]:
    """Patient id -> split for one fold: `test` is the fold itself; `validation` (checkpoint
    choice and the plateau schedule) is `val_fraction` of all patients (at least one; none
    for 0), drawn from the other folds spread over institutions; the rest is `train`."""
    if not 0 <= fold < folds:
        raise ConfigError(f"data.cv_fold={fold} must be in [0, {folds}) for {folds} folds")
    assignment = cv_folds(patient_ids, folds, seed)
    rest = [p for p, f in assignment.items() if f != fold]
    n_val = max(1, round(val_fraction * len(assignment))) if val_fraction > 0 else 0
    if n_val >= len(rest):
        raise ConfigError(
            f"{len(assignment)} patients in {folds} folds leave {len(rest)} outside the test "
            f"fold: too few for {n_val} validation patients and a training set"
        )
    chosen = set(
        _interleaved_by_institution(rest, np.random.default_rng([seed, folds, fold]))[:n_val]
    )
    return {
        p: "test" if f == fold else ("validation" if p in chosen else "train")
        for p, f in assignment.items()
    }


def check_config(config: ml_collections.ConfigDict) -> None:
    """The split fields of `config` (`data.split_*`, `data.cv_*`), or a ConfigError naming them."""
    data = config.data
    fractions = check_fractions(data.split_fractions)
    if fractions[0] == 0:
        raise ConfigError("data.split_fractions: training needs a train split")
    folds, fold = data.cv_folds, data.cv_fold
    if folds == 1 or folds < 0 or (folds and not -1 <= fold < folds):
        raise ConfigError(
            f"data.cv_folds={folds}, data.cv_fold={fold}: use cv_folds=0 (off) or >= 2, and "
            "cv_fold in [0, cv_folds) for one fold or -1 for all"
        )
    if not folds and fold != -1:
        raise ConfigError(f"data.cv_fold={fold} needs data.cv_folds >= 2 (cross-validation)")
    if folds and data.split_mode != "patient":
        raise ConfigError(
            "data.cv_folds, data.cv_fold: cross-validation splits by patient (split_mode)"
        )
    if data.context_slices and data.split_mode != "patient":
        raise ConfigError(
            f"data.context_slices={data.context_slices} needs whole volumes in each split "
            f"(data.split_mode='patient', not {data.split_mode!r}): a slice-level split "
            "separates a slice from its neighbours"
        )
    if data.split_mode not in SPLIT_MODES:
        raise ConfigError(f"data.split_mode={data.split_mode!r}: use one of {list(SPLIT_MODES)}")
    _check_validation(config)


def _check_validation(config: ml_collections.ConfigDict) -> None:
    """Without a validation split (data.split_fractions[1] == 0: every patient outside the
    test split trains), nothing may choose by validation loss."""
    if check_fractions(config.data.split_fractions)[1] > 0:
        return
    needs = []
    if config.lr_schedule == "plateau":
        needs.append("lr_schedule='plateau'")
    if config.evaluate.checkpoint == "best":
        needs.append("evaluate.checkpoint='best'")
    if config.early_stopping.patience:
        needs.append(f"early_stopping.patience={config.early_stopping.patience}")
    if needs:
        raise ConfigError(
            f"data.split_fractions={tuple(config.data.split_fractions)} leaves no validation "
            f"split, but {', '.join(needs)} choose(s) by validation loss: use "
            "lr_schedule='cosine', evaluate.checkpoint='last' and early_stopping.patience=0, "
            "or give validation a fraction"
        )


def check_best_has_validation(config: ml_collections.ConfigDict, checkpoint, where) -> None:
    """ConfigError when `checkpoint` is "best" for a run (`config`, its own) that trained
    without a validation split: its checkpoints carry no validation loss to choose by."""
    if checkpoint == "best" and tuple(config.data.split_fractions)[1] == 0:
        raise ConfigError(
            f"{where}: checkpoint 'best' is the lowest validation loss, but this run trained "
            "without a validation split (data.split_fractions[1] = 0): use 'last' "
            "(--config.evaluate.checkpoint=last)"
        )
