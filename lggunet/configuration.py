"""The one place for configs: checks before any work starts (so a run cannot fail an hour in
on a typo), the valid values, the run's saved `config.json` with the defaults that configs saved
by older versions lacked (versioned), and which of the saved and the given values a later
command uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from absl import logging

from lggunet import files, splits
from lggunet.augment import PRESETS
from lggunet.errors import ConfigError
from lggunet.losses import LOSSES
from lggunet.models import NORMS
from lggunet.normalization import NORMALIZATIONS

__all__ = [
    "CONFIG_FILE",
    "ConfigError",
    "check",
    "check_saved",
    "for_evaluation",
    "save_config",
    "saved_config",
    "upgrade",
]

CONFIG_FILE = "config.json"  # a run's config, beside its checkpoints
VERSION = 15  # `config_version` of configs written by this lggunet
# Fields added since the first saved configs, with the value that reproduces how runs made
# before them behaved: (the version that added the field, that value). `upgrade` fills them in.
ADDED = {
    "model.bn_momentum": (1, 0.99),
    "data.cv_folds": (1, 0),
    "data.cv_fold": (1, -1),
    "data.skip_invalid": (1, False),
    "data.phantom": (1, False),
    "data.download": (1, False),
    "data.oversample_tumour": (1, 1.0),
    "augment.preset": (1, ""),
    "augment.intensity": (1, False),
    "summary_every_epochs": (2, 1),
    "compilation_cache_dir": (2, ""),
    "predict.pixel_spacing_mm": (3, 0.0),
    "predict.slice_thickness_mm": (3, 0.0),
    "lr_schedule": (4, "plateau"),
    "warmup_epochs": (4, 0.0),
    "evaluate.checkpoint": (4, "best"),
    "predict.min_component_voxels": (4, 0),
    "model.output_bias": (5, 0.0),
    "soft_targets": (6, False),
    "augment.channel_copy_p": (7, 0.1),
    "augment.intensity_p_scale": (8, 1.0),
    "model.gpu_layers": (8, "off"),
    "profile.first_step": (9, 0),
    "profile.steps": (9, 5),
    "tversky_beta": (10, 0.5),
    "data.context_slices": (10, 0),
    "model.norm": (11, "batch"),
    "model.deep_supervision": (12, 0),
    "augment.tumour_contrast_p": (13, 0.0),
    "host_devices": (14, 1),
    "model.mirror_input": (15, False),
}
CHECKPOINTS = ("best", "last")  # evaluate.checkpoint: which kept checkpoint is used
DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("plateau", "cosine")
GPU_LAYERS = ("auto", "on", "off")  # model.gpu_layers
INTENSITY = "set augment.intensity=True or augment.preset='buda2019_intensity'"


# field -> (lowest, highest, whether the bounds themselves are allowed): numbers outside
# are refused up front, naming the field (None: no bound on that side).
RANGES = {
    "seed": (0, 2**31 - 1, True),
    "host_devices": (0, 4096, True),
    "num_epochs": (1, 100_000, True),
    "learning_rate": (0, 10, False),
    "tversky_beta": (0, 1, False),
    "warmup_epochs": (0, 100_000, True),
    "model.output_bias": (-20, 20, True),
    "log_every_steps": (1, None, True),
    "profile.first_step": (0, None, True),
    "profile.steps": (1, 1_000, True),  # the profiler holds the whole trace in memory
    "summary_images": (0, 64, True),
    "summary_every_epochs": (1, None, True),
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
    "data.context_slices": (0, 8, True),
    "augment.rotation_range": (0, 180, True),
    "augment.width_shift_range": (0, 1, True),
    "augment.height_shift_range": (0, 1, True),
    "augment.shear_range": (0, 90, True),
    "augment.zoom_range": (0, 1, False),
    "augment.channel_copy_p": (0, 1, True),
    "augment.intensity_p_scale": (0, 10, True),
    "augment.tumour_contrast_p": (0, 1, True),
    "evaluate.detection_min_pixels": (0, None, True),
    "predict.threshold": (0, 1, False),
    "predict.pixel_spacing_mm": (0, 100, True),
    "predict.slice_thickness_mm": (0, 100, True),
    "predict.min_component_voxels": (0, None, True),
    "model.features": (1, 4096, True),
    "model.depth": (1, 10, True),
    "model.dropout": (0, 1, True),
    "model.deep_supervision": (0, 9, True),  # and < model.depth
}


# Counts, where 7.5 would be truncated somewhere rather than refused.
WHOLE_NUMBERS = frozenset(
    {
        "evaluate.detection_min_pixels",
        "predict.min_component_voxels",
        "data.context_slices",
        "model.deep_supervision",
    }
)


_MISSING = object()


def _get(config: ml_collections.ConfigDict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return default
        node = node[part]
    return node


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first numeric field out of its range (RANGES), naming it. Fields
    the config lacks (a saved config of an older version, before `upgrade`) are skipped."""
    for field, (low, high, inclusive) in RANGES.items():
        value = _get(config, field, _MISSING)
        if value is _MISSING:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{field}={value!r} must be a number")
        if field in WHOLE_NUMBERS and not isinstance(value, int):
            raise ConfigError(f"{field}={value!r} must be a whole number")
        below = low is not None and (value < low if inclusive else value <= low)
        above = high is not None and (value > high if inclusive else value >= high)
        if below or above:
            lo = "" if low is None else f"{low} {'<=' if inclusive else '<'} "
            hi = "" if high is None else f" {'<=' if inclusive else '<'} {high}"
            raise ConfigError(f"{field}={value!r} is out of range: expected {lo}{field}{hi}")


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field when the config cannot work."""
    missing = [field for field in ADDED if _get(config, field) is None]
    if missing:
        raise ConfigError(
            f"the config lacks {', '.join(missing)}: start from lggunet.configs.unet's "
            "get_config() (or pass it through configuration.upgrade)"
        )
    check_ranges(config)
    size, depth = config.data.image_size, config.model.depth
    if size <= 0 or size % 2**depth:
        raise ConfigError(
            f"data.image_size={size} must be a positive multiple of 2**model.depth={2**depth}"
        )
    splits.check_config(config)
    _check_devices(config)
    _check_training(config)


def _check_devices(config: ml_collections.ConfigDict) -> None:
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
    if config.data.device_cache and jax.process_count() > 1:
        raise ConfigError("data.device_cache works in single-process runs only")


def _check_training(config: ml_collections.ConfigDict) -> None:
    if config.loss not in LOSSES:
        raise ConfigError(f"loss={config.loss!r}: choose one of {sorted(LOSSES)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype={config.dtype!r}: use one of {list(DTYPES)}")
    if config.model.gpu_layers not in GPU_LAYERS:
        raise ConfigError(
            f"model.gpu_layers={config.model.gpu_layers!r}: use one of {list(GPU_LAYERS)}"
        )
    if config.num_epochs <= 0 or config.learning_rate <= 0:
        raise ConfigError("num_epochs and learning_rate must be positive")
    if config.model.norm not in NORMS:
        raise ConfigError(f"model.norm={config.model.norm!r}: use one of {list(NORMS)}")
    _check_deep_supervision(config)
    if not isinstance(config.model.mirror_input, bool):
        raise ConfigError(f"model.mirror_input={config.model.mirror_input!r}: use true or false")
    if config.model.mirror_input and config.augment.get("tumour_contrast_p", 0) > 0:
        raise ConfigError(
            "model.mirror_input with augment.tumour_contrast_p > 0: the fainter tumour would "
            "be drawn on the mirror image at the slice's own mask; use one or the other"
        )
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={config.lr_schedule!r}: use one of {list(LR_SCHEDULES)}")
    if config.evaluate.checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"evaluate.checkpoint={config.evaluate.checkpoint!r}: use one of {list(CHECKPOINTS)}"
        )
    if config.warmup_epochs and config.lr_schedule != "cosine":
        raise ConfigError(
            f"warmup_epochs={config.warmup_epochs} works with lr_schedule='cosine' only "
            f"(lr_schedule={config.lr_schedule!r})"
        )
    if config.warmup_epochs >= config.num_epochs:
        raise ConfigError(
            f"warmup_epochs={config.warmup_epochs} must be below num_epochs={config.num_epochs}: "
            "train longer or lower warmup_epochs (0 = no warm-up)"
        )
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
    intensity = config.augment.intensity or (
        config.augment.preset and PRESETS[config.augment.preset].intensity is not None
    )
    if config.augment.enabled and intensity and config.data.normalize == "scale":
        raise ConfigError(
            "augment.intensity (or preset buda2019_intensity) works on z-scored inputs (noise, "
            "brightness, gamma in units of the brain's std): set data.normalize='brain_zscore'"
        )
    if config.augment.tumour_contrast_p and not (config.augment.enabled and intensity):
        p = config.augment.tumour_contrast_p
        raise ConfigError(f"augment.tumour_contrast_p={p} is an intensity transform: {INTENSITY}")
    if not 0 <= config.model.dropout < 1:
        raise ConfigError(f"model.dropout={config.model.dropout} must be in [0, 1)")
    if not 0 <= config.model.bn_momentum < 1:
        raise ConfigError(f"model.bn_momentum={config.model.bn_momentum} must be in [0, 1)")


def _check_deep_supervision(config: ml_collections.ConfigDict) -> None:
    supervised = config.model.get("deep_supervision", 0)
    if supervised >= config.model.depth:
        raise ConfigError(
            f"model.deep_supervision={supervised!r}: use 0 (off) to model.depth - 1 "
            f"({config.model.depth - 1}), the coarse decoder levels given a loss"
        )


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
        _check_deep_supervision(config)
    except (ConfigError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{path}: not a usable saved config ({e}); restore the file the run wrote, or "
            "train again into another workdir"
        ) from e


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with every field that its (older) version lacked filled in with the
    value that reproduces how such runs behaved (`ADDED`), marked as the current VERSION."""
    tree = config.to_dict()
    for field, (_, value) in ADDED.items():
        node = tree
        *parents, leaf = field.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, value)
    tree["config_version"] = VERSION
    return ml_collections.ConfigDict(tree)


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Writes the run's config next to its checkpoints (load_model reads it)."""
    path = Path(workdir) / CONFIG_FILE
    # Folds of one cross-validation trained side by side (data.cv_fold=k) all write it.
    files.write_atomic(path, config.to_json_best_effort(indent=2) + "\n")
    return path


def saved_config(workdir: str | Path) -> ml_collections.ConfigDict | None:
    """The run's config.json, upgraded to this version (None when there is none); a
    ConfigError naming the file when it cannot be used."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        tree = json.loads(path.read_text())
        if not isinstance(tree, dict):
            raise ValueError(f"a JSON {type(tree).__name__}, not an object")
        config = ml_collections.ConfigDict(tree)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a readable config ({e})") from e
    check_saved(config, path)
    version = config.get("config_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ConfigError(
            f"{path}: config_version {version!r} is newer than this lggunet's ({VERSION}): "
            "upgrade lggunet to use that run"
        )
    return upgrade(config)


def for_evaluation(
    saved: ml_collections.ConfigDict | None, given: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The config a later command (evaluate, a fold's scoring) runs with: the run's saved
    settings (its model, preprocessing and split: the test patients stay the ones held out),
    with the given command's data paths (`data.manual_dir`, `data.data_dir` when set),
    `data.skip_invalid` when either asks for it, and its `evaluate.*`. The run's own
    `eval_batch_size` stays where this machine's devices divide it: the notebook's batch
    metrics depend on how slices are grouped, and the report repeats training's figures.
    Without a saved config, the given one."""
    out = upgrade(saved if saved is not None else given)
    for key in ("manual_dir", "data_dir"):
        if given.data[key]:
            out.data[key] = given.data[key]
    out.data.skip_invalid = bool(out.data.skip_invalid or given.data.skip_invalid)
    out.evaluate = ml_collections.ConfigDict(given.evaluate.to_dict())
    if out.eval_batch_size % jax.device_count():  # another machine: the given one (checked)
        logging.warning(
            "eval_batch_size %d of the run does not split over %d devices: %d used, so the "
            "notebook's batch metrics may differ slightly from training's",
            *(out.eval_batch_size, jax.device_count(), given.eval_batch_size),
        )
        out.eval_batch_size = given.eval_batch_size
    return out


def describe(config: ml_collections.ConfigDict) -> str:
    """The training recipe in one short line (config.json has every field)."""
    augment = config.augment.preset or ("custom" if config.augment.enabled else "none")
    oversample = config.data.oversample_tumour
    return (
        f"Recipe: {config.data.image_size}x{config.data.image_size} input, loss {config.loss}"
        + (f" (Tversky beta {config.tversky_beta:g})" if config.tversky_beta != 0.5 else "")
        + ", "
        f"normalize {config.data.normalize}, augment {augment}, Adam {config.learning_rate:g}, "
        f"batch {config.batch_size}, {config.num_epochs} epochs"
        + (", cosine learning rate" if config.lr_schedule == "cosine" else "")
        + (f", tumour slices x{oversample:g}" if oversample > 1 else "")
        + (f", fainter tumours (p {p:g})" if (p := config.augment.tumour_contrast_p) else "")
        + (f", 2.5D ({k} slices each side)" if (k := config.data.context_slices) else "")
        + (", InstanceNorm" if config.model.get("norm", "batch") == "instance" else "")
        + (f", deep supervision ({d} levels)" if (d := config.model.deep_supervision) else "")
        + (", mirror input" if config.model.get("mirror_input") else "")
    )
