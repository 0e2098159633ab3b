"""Checks a config before any work starts, so a run cannot fail an hour in on a typo."""

from __future__ import annotations

import jax
import ml_collections

from lggunet.augment import PRESETS
from lggunet.errors import ConfigError
from lggunet.losses import LOSSES
from lggunet.normalization import NORMALIZATIONS

__all__ = ["ConfigError", "check"]


# field -> (lowest, highest, whether the bounds themselves are allowed): numbers outside
# are refused up front, naming the field (None: no bound on that side).
RANGES = {
    "seed": (0, 2**31 - 1, True),
    "num_epochs": (1, 100_000, True),
    "learning_rate": (0, 10, False),
    "log_every_steps": (1, None, True),
    "summary_images": (0, 64, True),
    "early_stopping.patience": (0, None, True),
    "early_stopping.min_delta": (0, None, True),
    "plateau.factor": (0, 1, False),
    "plateau.patience": (0, None, True),
    "plateau.min_delta": (0, None, True),
    "plateau.cooldown": (0, None, True),
    "data.phantom_patients": (3, 10_000, True),
    "data.phantom_slices": (1, 1_000, True),
    "data.phantom_seed": (0, 2**31 - 1, True),
    "data.image_size": (8, 4096, True),
    "data.split_seed": (0, 2**31 - 1, True),
    "data.num_threads": (1, 1024, True),
    "data.num_workers": (0, 1024, True),
    "data.oversample_tumour": (1, 100, True),
    "augment.rotation_range": (0, 180, True),
    "augment.width_shift_range": (0, 1, True),
    "augment.height_shift_range": (0, 1, True),
    "augment.shear_range": (0, 90, True),
    "augment.zoom_range": (0, 1, False),
    "evaluate.detection_min_pixels": (0, None, True),
    "predict.threshold": (0, 1, False),
    "model.features": (1, 4096, True),
    "model.depth": (1, 10, True),
    "model.dropout": (0, 1, True),
}


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first numeric field out of its range (RANGES), naming it."""
    for field, (low, high, inclusive) in RANGES.items():
        value = _get(config, field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{field}={value!r} must be a number")
        below = low is not None and (value < low if inclusive else value <= low)
        above = high is not None and (value > high if inclusive else value >= high)
        if below or above:
            lo = "" if low is None else f"{low} {'<=' if inclusive else '<'} "
            hi = "" if high is None else f" {'<=' if inclusive else '<'} {high}"
            raise ConfigError(f"{field}={value!r} is out of range: expected {lo}{field}{hi}")


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field when the config cannot work."""
    check_ranges(config)
    size, depth = config.data.image_size, config.model.depth
    if size <= 0 or size % 2**depth:
        raise ConfigError(
            f"data.image_size={size} must be a positive multiple of 2**model.depth={2**depth}"
        )
    fractions = tuple(config.data.split_fractions)
    numeric = all(
        isinstance(f, int | float) and not isinstance(f, bool) and f == f for f in fractions
    )
    if not numeric or len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"data.split_fractions={fractions} must be (train, validation, test), "
            "non-negative, summing to 1"
        )
    if fractions[0] == 0 or fractions[1] == 0:
        raise ConfigError("data.split_fractions: training needs train and validation splits")
    folds, fold = config.data.get("cv_folds", 0), config.data.get("cv_fold", -1)
    if folds == 1 or folds < 0 or (folds and not -1 <= fold < folds):
        raise ConfigError(
            f"data.cv_folds={folds}, data.cv_fold={fold}: use cv_folds=0 (off) or >= 2, and "
            "cv_fold in [0, cv_folds) for one fold or -1 for all"
        )
    if not folds and fold != -1:
        raise ConfigError(f"data.cv_fold={fold} needs data.cv_folds >= 2 (cross-validation)")
    if folds and config.data.split_mode != "patient":
        raise ConfigError(
            "data.cv_folds, data.cv_fold: cross-validation splits by patient (split_mode)"
        )
    if config.data.split_mode not in ("patient", "slice"):
        raise ConfigError(f"data.split_mode={config.data.split_mode!r}: use 'patient' or 'slice'")
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={config.batch_size} must divide among {jax.process_count()} processes"
        )
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value <= 0 or value % jax.device_count():
            raise ConfigError(
                f"{name}={value} must be a positive multiple of the {jax.device_count()} "
                f"devices ({jax.process_count()} process(es)): each device takes an equal part"
            )
    if config.loss not in LOSSES:
        raise ConfigError(f"loss={config.loss!r}: choose one of {sorted(LOSSES)}")
    if config.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
    if config.num_epochs <= 0 or config.learning_rate <= 0:
        raise ConfigError("num_epochs and learning_rate must be positive")
    if config.data.normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"data.normalize={config.data.normalize!r}: choose one of {list(NORMALIZATIONS)}"
        )
    if config.data.oversample_tumour < 1:
        raise ConfigError(f"data.oversample_tumour={config.data.oversample_tumour} must be >= 1")
    if config.augment.preset and config.augment.preset not in PRESETS:
        raise ConfigError(
            f"augment.preset={config.augment.preset!r}: choose '' or one of {sorted(PRESETS)}"
        )
    intensity = config.augment.get("intensity", False) or (
        config.augment.preset and PRESETS[config.augment.preset].intensity is not None
    )
    if config.augment.enabled and intensity and config.data.normalize == "scale":
        raise ConfigError(
            "augment.intensity (or preset buda2019_intensity) works on z-scored inputs (noise, "
            "brightness, gamma in units of the brain's std): set data.normalize='brain_zscore'"
        )
    if config.early_stopping.patience < 0:
        raise ConfigError(
            f"early_stopping.patience={config.early_stopping.patience} must be >= 0 (0 = off)"
        )
    if config.data.device_cache and jax.process_count() > 1:
        raise ConfigError("data.device_cache works in single-process runs only")
    if not 0 <= config.model.dropout < 1:
        raise ConfigError(f"model.dropout={config.model.dropout} must be in [0, 1)")
    if not 0 <= config.model.get("bn_momentum", 0.99) < 1:
        raise ConfigError(f"model.bn_momentum={config.model.bn_momentum} must be in [0, 1)")


def check_saved(config: ml_collections.ConfigDict, path) -> None:
    """A run's saved config.json holds what loading its model needs, in range; ConfigError
    naming the file otherwise."""
    try:
        check_ranges(config)
        for field in ("data.image_size", "data.normalize", "model.features", "model.depth"):
            if _get(config, field) is None:
                raise ConfigError(f"it lacks {field}")
        if config.data.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"data.normalize={config.data.normalize!r} is not one of {list(NORMALIZATIONS)}"
            )
        if config.data.image_size % 2**config.model.depth:
            raise ConfigError("data.image_size is not a multiple of 2**model.depth")
    except (ConfigError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path}: not a usable saved config ({e}); restore the file the run wrote, or "
            "train again into another workdir"
        ) from e
