"""A trained U-Net as a plain callable: `load_model(workdir)` and `predict(images, model)`.

For research code that wants masks without the config system or the data pipeline:

    import lggunet
    model = lggunet.load_model("runs/unet")            # the best checkpoint of that run
    masks = lggunet.predict(images, model)             # (N, H, W) uint8 in {0, 1}
    probs = model(images)                              # (N, H, W) float32 p(tumour)

`images` is (N, H, W, 3) (pre-contrast, FLAIR, post-contrast) or one (H, W, 3) slice, uint8
on the TIFFs' 0..255 scale, or float with an explicit `scale=` (255 for [0, 1]); any H and W
(resized to the model's input size and the probabilities mapped back). Anything else (NaNs,
channels first, uint16 beyond 255, no pixels) is an InputError saying what was expected. Runs
on the default device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from lggunet import config_checks, files, kaggle3m, models, normalization, parallel
from lggunet.checkpointing import CheckpointStore
from lggunet.errors import ConfigError, InputError

CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Writes the run's config next to its checkpoints (load_model reads it)."""
    path = Path(workdir) / CONFIG_FILE
    # Folds of one cross-validation trained side by side (data.cv_fold=k) all write it.
    files.write_atomic(path, config.to_json_best_effort(indent=2) + "\n")
    return path


def saved_config(workdir: str | Path) -> ml_collections.ConfigDict | None:
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
    config_checks.check_saved(config, path)
    return config


@functools.partial(jax.jit, static_argnames=("module", "image_size", "normalize", "tta"))
def _probabilities(variables, images, mean, std, brain, *, module, image_size, normalize, tta):
    n, h, w, _ = images.shape
    x = normalization.normalize_images(images, normalize, mean, std, brain)
    if (h, w) != (image_size, image_size):
        x = jax.image.resize(x, (n, image_size, image_size, 3), "linear")
    probs = jax.nn.sigmoid(module.apply(variables, x, train=False))
    if tta:  # average with the prediction on the horizontally flipped slices
        flipped = jax.nn.sigmoid(module.apply(variables, x[:, :, ::-1], train=False))
        probs = 0.5 * (probs + flipped[:, :, ::-1])
    if (h, w) != (image_size, image_size):
        probs = jax.image.resize(probs, (n, h, w, 1), "linear")
    return probs[..., 0]


@dataclasses.dataclass
class Model:
    """A U-Net with its weights and the preprocessing it was trained with."""

    module: models.UNet
    variables: dict[str, Any]
    image_size: int
    normalize: str = "scale"
    tta: bool = False  # average with the horizontally flipped prediction
    batch_size: int = 16
    step: int | None = None  # the training step of the checkpoint
    record: dict = dataclasses.field(default_factory=dict)  # the checkpoint's JSON record

    def __call__(
        self, images, volume_mean=None, volume_std=None, brain_stats=None, *, scale=None
    ) -> np.ndarray:
        """p(tumour) per pixel, (N, H, W) float32 (or (H, W) for one slice).

        `images` as `check_images` takes them (uint8 0..255 like the TIFFs; a float array
        needs `scale`, e.g. scale=255 for images in [0, 1]).

        Per-patient normalisations (`zscore_volume`, `brain_zscore`) use the given statistics
        (`volume_mean`/`volume_std` (3,) or (N, 3); `brain_stats` (6, 3) or (N, 6, 3), see
        `lggunet.normalization`), or, if none are given, those of `images` taken as one volume.
        """
        images = check_images(images, scale)
        single = images.ndim == 3
        if single:
            images = images[None]
        for name, value, shape in (
            ("volume_mean", volume_mean, (3,)),
            ("volume_std", volume_std, (3,)),
            ("brain_stats", brain_stats, (6, 3)),
        ):
            _check_statistics(name, value, shape, len(images))
        if self.normalize == "zscore_volume" and volume_mean is None:
            volume_mean, volume_std = kaggle3m.volume_statistics(images)
        if self.normalize == "brain_zscore" and brain_stats is None:
            brain_stats = normalization.brain_statistics(images)
        brain = np.broadcast_to(
            np.asarray(1.0 if brain_stats is None else brain_stats, np.float32),
            (len(images), 6, 3),
        )
        mean = np.broadcast_to(
            np.asarray(0.0 if volume_mean is None else volume_mean, np.float32), (len(images), 3)
        )
        std = np.broadcast_to(
            np.asarray(1.0 if volume_std is None else volume_std, np.float32), (len(images), 3)
        )
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            count = len(images[chunk])
            pad = self.batch_size - count  # fixed shapes: one compilation per image size

            def padded(a, pad=pad):
                return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

            probs = _probabilities(
                self.variables,
                padded(images[chunk].astype(np.float32)),
                padded(mean[chunk]),
                padded(std[chunk]),
                padded(brain[chunk]),
                module=self.module,
                image_size=self.image_size,
                normalize=self.normalize,
                tta=self.tta,
            )
            out.append(np.asarray(probs)[:count])
        probs = np.concatenate(out)
        return probs[0] if single else probs


@dataclasses.dataclass
class Ensemble:
    """Several models (e.g. the k fold models of a cross-validation run) as one: their
    probabilities averaged, each member with its own input size and normalisation."""

    members: list[Model]

    def __post_init__(self):
        if not self.members:
            raise ConfigError("an ensemble needs at least one model")

    def __call__(
        self, images, volume_mean=None, volume_std=None, brain_stats=None, *, scale=None
    ) -> np.ndarray:
        """Mean p(tumour) of the members, shaped as `Model.__call__`'s."""
        images = check_images(images, scale)
        total = None
        for member in self.members:
            p = member(images, volume_mean, volume_std, brain_stats, scale=1)
            total = p.astype(np.float64) if total is None else total + p
        return (total / len(self.members)).astype(np.float32)


def largest_component(masks: np.ndarray) -> np.ndarray:
    """Keeps the largest connected component (26-connectivity in 3D: the masks are one
    patient's slices in order; 8-connectivity for one 2D slice), as Buda et al."""
    masks = np.asarray(masks) > 0
    if not masks.any():
        return masks.astype(np.uint8)
    structure = np.ones((3,) * masks.ndim, bool)
    labels, count = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def _check_statistics(name: str, value, shape: tuple, n: int) -> None:
    """A per-volume statistic of `shape` (or one per slice, (n, *shape)), finite; a std >= 0."""
    if value is None:
        return
    try:
        value = np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not numeric ({e})") from e
    if value.shape not in (shape, (n, *shape)):
        raise InputError(f"{name} of shape {value.shape}: expected {shape} or {(n, *shape)}")
    if not np.isfinite(value).all():
        raise InputError(f"{name} holds NaN or infinite values")
    if name == "brain_stats" and (value[..., 5, :] <= 0).any():
        raise InputError("brain_stats' std row (5) must be positive (see brain_statistics)")
    if name == "volume_std" and (value < 0).any():
        raise InputError("volume_std must not be negative (a channel's spread over the volume)")


def check_threshold(threshold: float) -> float:
    """A probability threshold strictly between 0 and 1 (InputError naming it otherwise)."""
    if isinstance(threshold, np.ndarray) and threshold.ndim == 0:
        threshold = threshold.item()
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0 < threshold < 1
    ):
        raise InputError(
            f"threshold={threshold!r} must be a probability strictly between 0 and 1 (p > "
            "threshold is tumour; 0.5 is the default)"
        )
    return float(threshold)


def check_images(images, scale: float | None = None) -> np.ndarray:
    """`images` as the model takes them, float32 (N, H, W, 3) or (H, W, 3) on the TIFFs' 0..255
    scale, or an InputError saying what was expected: integers in 0..255 (uint8 as read from
    the TIFFs), or floats with an explicit `scale` (255 for images in [0, 1], 1 for 0..255);
    finite; channels last (pre-contrast, FLAIR, post-contrast); at least one pixel."""
    if isinstance(scale, np.ndarray) and scale.ndim == 0:
        scale = scale.item()
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < np.inf
    ):
        raise InputError(f"scale={scale!r} must be a positive number (255 for images in [0, 1])")
    if isinstance(images, np.ma.MaskedArray):
        raise InputError(
            "images are a masked array: fill the masked pixels first (images.filled(0))"
        )
    try:
        images = np.asarray(images)
    except ValueError as e:  # a ragged list of slices
        raise InputError(f"images cannot be one array ({e}): give slices of one size") from e
    if images.dtype.kind not in "uif":
        raise InputError(f"images of dtype {images.dtype}: expected uint8 (or float with scale=)")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        hint = ""
        if images.ndim in (3, 4) and images.shape[-3] == 3:
            hint = " (channels first? move them last: np.moveaxis(images, -3, -1))"
        raise InputError(
            f"images of shape {images.shape}: expected (N, H, W, 3) or (H, W, 3), the 3 "
            f"channels last (pre-contrast, FLAIR, post-contrast){hint}"
        )
    if images.size == 0:
        raise InputError(f"images of shape {images.shape} hold no pixels: give at least one slice")
    given_float = images.dtype.kind == "f"
    if images.dtype.kind == "f" and scale is None:
        raise InputError(
            f"images are {images.dtype}: say their scale, scale=255 for values in [0, 1] "
            "or scale=1 for 0..255 (the model was trained on 0..255 uint8 TIFFs)"
        )
    if scale not in (None, 1):  # in float64, checked after: no overflow or underflow slips by
        images = images.astype(np.float64) * float(scale)
    if images.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(images)))
        if bad:
            raise InputError(f"images hold {bad} NaN or infinite value(s) (after scaling)")
    low, high = float(images.min()), float(images.max())
    if 0 < high < 1 or (given_float and 0 < high <= 1):
        raise InputError(
            f"images reach only {high:g} after scaling, not one step of 0..255: the scale "
            "is likely wrong (255 for images in [0, 1], 1 for 0..255)"
        )
    if low < 0 or high > 255 * (1 + 1e-3):
        raise InputError(
            f"images range over {low:g}..{high:g} after scaling, expected 0..255 (uint8 TIFFs): "
            f"rescale them (e.g. images / images.max() * 255), or pass the right scale="
        )
    return images.astype(np.float32)


def predict(
    images,
    model: Model,
    *,
    threshold: float = 0.5,
    largest_connected_component: bool = False,
    volume_mean=None,
    volume_std=None,
    brain_stats=None,
    scale: float | None = None,
) -> np.ndarray:
    """Binary masks (N, H, W) uint8 in {0, 1} (or (H, W) for one slice): p > threshold.

    `images` and `scale` as `check_images` takes them. With `largest_connected_component`,
    `images` are taken as one patient's slices in order and only the largest 3D component is
    kept.
    """
    threshold = check_threshold(threshold)
    probs = model(
        images,
        volume_mean=volume_mean,
        volume_std=volume_std,
        brain_stats=brain_stats,
        scale=scale,
    )
    masks = (probs > threshold).astype(np.uint8)
    return largest_component(masks) if largest_connected_component else masks


def find_checkpoints(path: str | Path) -> tuple[Path, Path]:
    """(workdir, checkpoints dir) for a run's workdir or its `checkpoints/` folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such directory")
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints"
    if path.name == "checkpoints":
        return path.parent, path
    raise ConfigError(f"{path}: not a training workdir (no checkpoints/ folder in it)")


def restore_variables(
    config: ml_collections.ConfigDict, checkpoints: Path, which: str = "best"
) -> tuple[dict[str, Any], dict]:
    """({"params", "batch_stats"}, the checkpoint's record) of the best or latest checkpoint."""
    from lggunet import train

    store = CheckpointStore(checkpoints)
    try:
        if store.latest_step() is None:
            raise ConfigError(f"{checkpoints}: no complete checkpoint to load")
        template, _ = train.initial_state(config, parallel.data_mesh())
        try:
            if which == "best":
                state, meta = store.restore_best(template)
            else:
                state, meta = store.restore_latest(template)
        except Exception as e:  # another model's checkpoints, or only damaged ones
            raise ConfigError(
                f"{checkpoints}: no checkpoint can be read as the config's model "
                f"(features={config.model.features}, depth={config.model.depth}): "
                f"{type(e).__name__}: {str(e)[:500]}"
            ) from e
        step = int(meta.get("step", state.step))
    finally:
        store.close()
    variables = {"params": state.params}
    if config.model.batch_norm:
        variables["batch_stats"] = state.batch_stats
    variables = jax.device_get(variables)
    return jax.tree.map(jnp.asarray, variables), {**meta, "checkpoint_step": step}


def model_from_config(
    config: ml_collections.ConfigDict, checkpoints: Path, tta: bool = False
) -> Model:
    from lggunet import train

    variables, meta = restore_variables(config, checkpoints)
    return Model(
        module=train.create_model(config),
        variables=variables,
        image_size=config.data.image_size,
        normalize=config.data.normalize,
        tta=tta,
        batch_size=max(1, min(config.eval_batch_size, 32)),
        step=meta["checkpoint_step"],
        record=meta,
    )


def cv_folds_of(workdir: str | Path) -> int:
    """The number of folds when `workdir` is a cross-validation run's, else 0."""
    config = saved_config(workdir)
    return int(config.data.get("cv_folds", 0)) if config is not None else 0


def is_cv_workdir(path: str | Path) -> bool:
    """True for the top folder of a cross-validation run (not one of its fold workdirs)."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "checkpoints").is_dir():
        return False
    config = saved_config(path)
    if config is None:
        return False
    data = config.data
    return int(data.get("cv_folds", 0)) > 1 and int(data.get("cv_fold", -1)) < 0


def fold_workdir(workdir: str | Path, fold: int) -> Path:
    """Where fold `fold` of a cross-validation run trains."""
    return Path(workdir) / f"fold_{fold}"


def load_ensemble(workdir: str | Path, *, tta: bool = False) -> Ensemble:
    """Every fold model of a cross-validation workdir, averaged; all folds must be trained."""
    workdir = Path(workdir).expanduser()
    folds = cv_folds_of(workdir)
    members = []
    for k in range(folds):
        fold_dir = fold_workdir(workdir, k)
        if not (fold_dir / "checkpoints").is_dir():
            raise ConfigError(
                f"{fold_dir}: fold {k} of {folds} has no checkpoints yet; finish the "
                f"cross-validation (rerun its training command) or load one fold's folder"
            )
        members.append(load_model(fold_dir, tta=tta))
    return Ensemble(members)


def load_model(path: str | Path, *, tta: bool = False) -> Model | Ensemble:
    """The best checkpoint of a training run (its workdir or its `checkpoints/` folder), with
    the model and preprocessing settings that run saved in `config.json`; for a
    cross-validation workdir, the ensemble of its fold models."""
    path = Path(path).expanduser()
    if is_cv_workdir(path):
        return load_ensemble(path, tta=tta)
    workdir, checkpoints = find_checkpoints(path)
    config = saved_config(workdir)
    if config is None:
        raise ConfigError(
            f"{workdir}: no {CONFIG_FILE} (runs from before it was written): use "
            "inference.model_from_config(config, checkpoints_dir) with the training config"
        )
    return model_from_config(config, checkpoints, tta=tta)


def load_model_for(
    config: ml_collections.ConfigDict, workdir: str | Path, *, tta: bool = False
) -> Model | Ensemble:
    """The best checkpoint of `workdir`, built with the run's saved config.json when there is
    one (else with `config`); the fold ensemble for a cross-validation workdir."""
    if is_cv_workdir(workdir):
        return load_ensemble(workdir, tta=tta)
    workdir, checkpoints = find_checkpoints(workdir)
    return model_from_config(saved_config(workdir) or config, checkpoints, tta=tta)
