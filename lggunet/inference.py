"""A trained U-Net as a plain callable: `load_model(workdir)` and `predict(images, model)`.

For research code that wants masks without the config system or the data pipeline:

    import lggunet
    model = lggunet.load_model("runs/unet")            # the checkpoint that run chose
    masks = lggunet.predict(images, model)             # (N, H, W) uint8 in {0, 1}, as its
                                                       # recipe predicts (threshold, filters)
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
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from lggunet import configuration, kaggle3m, models, normalization, postprocessing, steps, workdirs
from lggunet.checkpointing import CheckpointStore
from lggunet.context import normalize_stacked, volume_neighbours
from lggunet.errors import ConfigError, InputError
from lggunet.inputs import check_images, check_statistics, check_threshold
from lggunet.splits import check_best_has_validation

__all__ = [
    "Ensemble",
    "load_pretrained",
    "Model",
    "check_images",
    "check_threshold",
    "load_model",
    "load_model_for",
    "model_from_config",
    "predict",
    "restore_variables",
]


@functools.partial(jax.jit, static_argnames=("image_size", "normalize", "tta"))
def _probabilities(weights, images, neighbours, mean, std, brain, *, image_size, normalize, tta):
    x = normalize_stacked(images, neighbours, normalize, mean, std, brain)
    return steps.probabilities(weights, x, image_size, tta)[..., 0]


@dataclasses.dataclass
class Model:
    """A U-Net with its weights and the preprocessing it was trained with."""

    module: models.UNet
    variables: dict[str, Any]
    image_size: int
    normalize: str = "scale"
    tta: bool = False  # average with the horizontally flipped prediction
    batch_size: int = 16
    context_slices: int = 0  # 2.5D: neighbours on each side stacked as channels
    step: int | None = None  # the training step of the checkpoint
    record: dict = dataclasses.field(default_factory=dict)  # the checkpoint's JSON record
    config: ml_collections.ConfigDict | None = dataclasses.field(default=None, repr=False)

    @property
    def weights(self) -> steps.Weights:
        return steps.Weights(
            params=self.variables["params"],
            batch_stats=self.variables.get("batch_stats", {}),
            apply_fn=self.module.apply,
        )

    def __repr__(self) -> str:
        count = sum(x.size for x in jax.tree.leaves(self.variables.get("params", {})))
        return (
            f"Model(U-Net features={self.module.features} depth={self.module.depth}, "
            f"{count / 1e6:.2f}M parameters, input {self.image_size}x{self.image_size}, "
            f"normalize={self.normalize!r}, tta={self.tta}, "
            + (f"context_slices={self.context_slices}, " if self.context_slices else "")
            + (f"norm={self.module.norm!r}, " if self.module.norm != "batch" else "")
            + ("mirror_input=True, " if self.module.mirror_input else "")
            + (f"{self.record['name']}, " if self.record.get("name") else "")
            + f"checkpoint step {self.step})"
        )

    def __call__(
        self, images, volume_mean=None, volume_std=None, brain_stats=None, *, scale=None
    ) -> np.ndarray:
        """p(tumour) per pixel, (N, H, W) float32 (or (H, W) for one slice).

        `images` as `check_images` takes them (uint8 0..255 like the TIFFs; a float array
        needs `scale`, e.g. scale=255 for images in [0, 1]).

        Per-patient normalisations (`zscore_volume`, `brain_zscore`) use the given statistics
        (`volume_mean`/`volume_std` (3,) or (N, 3); `brain_stats` (6, 3) or (N, 6, 3), see
        `lggunet.normalization`), or, if none are given, those of `images` taken as one volume.
        A 2.5D model (`context_slices` > 0) takes `images` as one volume in slice order: each
        slice's neighbours are the slices beside it in `images`.
        """
        images = check_images(images, scale)
        single = images.ndim == 3
        if single and self.context_slices:
            raise InputError(
                f"a 2.5D model (context_slices={self.context_slices}) reads each slice with "
                "its neighbours: give it the (N, H, W, 3) slices of a volume in order"
            )
        if single:
            images = images[None]
        for name, value, shape in (
            ("volume_mean", volume_mean, (3,)),
            ("volume_std", volume_std, (3,)),
            ("brain_stats", brain_stats, (6, 3)),
        ):
            check_statistics(name, value, shape, len(images))
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
        table = None
        if self.context_slices:
            table = volume_neighbours(len(images), self.context_slices)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            count = len(images[chunk])
            pad = self.batch_size - count  # fixed shapes: one compilation per image size

            def padded(a, pad=pad):
                return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

            neighbours = None if table is None else padded(images[table[chunk]])
            probs = _probabilities(
                self.weights,
                padded(images[chunk].astype(np.float32)),
                neighbours,
                padded(mean[chunk]),
                padded(std[chunk]),
                padded(brain[chunk]),
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

    def __repr__(self) -> str:
        return f"Ensemble of {len(self.members)}: " + "; ".join(map(repr, self.members))

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


def predict(
    images,
    model: Model | Ensemble,
    *,
    threshold: float | None = None,
    largest_connected_component: bool | None = None,
    min_component_voxels: int | None = None,
    volume_mean=None,
    volume_std=None,
    brain_stats=None,
    scale: float | None = None,
) -> np.ndarray:
    """Binary masks (N, H, W) uint8 in {0, 1} (or (H, W) for one slice): p > threshold.

    `images` and `scale` as `check_images` takes them. With `largest_connected_component` or
    `min_component_voxels`, `images` are taken as one patient's slices in order and only the
    largest 3D component is kept, or those of at least that many voxels. None: what the
    model's recipe predicts with (`postprocessing.recipe_settings`), as `--mode=predict`
    does; for one (H, W, 3) slice the recipe's 3D component filters are not applied.
    """
    recipe_threshold, recipe_largest, recipe_min_voxels = postprocessing.recipe_settings(model)
    threshold = check_threshold(recipe_threshold if threshold is None else threshold)
    if min_component_voxels is not None:
        postprocessing.check_min_voxels(min_component_voxels)
    if largest_connected_component is not None:
        postprocessing.check_flag(largest_connected_component, "largest_connected_component")
    probs = model(
        images,
        volume_mean=volume_mean,
        volume_std=volume_std,
        brain_stats=brain_stats,
        scale=scale,
    )
    one_slice = probs.ndim == 2
    if largest_connected_component is None:
        largest_connected_component = recipe_largest and not one_slice
    if min_component_voxels is None:
        min_component_voxels = 0 if one_slice else recipe_min_voxels
    masks = (probs > threshold).astype(np.uint8)
    return postprocessing.postprocess(masks, largest_connected_component, min_component_voxels)


def check_checkpoint(checkpoint: str | int | None) -> str | int | None:
    """`checkpoint` if it names one ("best", "last", a step number >= 0, or None: the run's
    `evaluate.checkpoint`); else ConfigError."""
    if checkpoint is None:
        return None
    named = isinstance(checkpoint, str) and checkpoint in configuration.CHECKPOINTS
    whole = isinstance(checkpoint, int | np.integer) and not isinstance(checkpoint, bool)
    step = whole and checkpoint >= 0
    if not (named or step):
        why = "use 'best' (lowest validation loss), 'last' or a step number"
        raise ConfigError(f"checkpoint={checkpoint!r}: {why}")
    return int(checkpoint) if step else checkpoint


def restore_variables(
    config: ml_collections.ConfigDict, checkpoints: Path, checkpoint: str | int | None = None
) -> tuple[dict[str, Any], dict]:
    """({"params"[, "batch_stats"]}, the checkpoint's record) of `checkpoint` ("best": the
    lowest validation loss, "last": the newest, each else the next readable one; a step
    number; None: `config.evaluate.checkpoint`): only the weights, not the optimizer's."""
    checkpoint = check_checkpoint(checkpoint)
    checkpoint = config.evaluate.get("checkpoint", "best") if checkpoint is None else checkpoint
    check_best_has_validation(config, checkpoint, checkpoints)
    abstract = models.abstract_variables(config)
    store = CheckpointStore(checkpoints)
    try:
        if store.latest_step() is None:
            raise ConfigError(f"{checkpoints}: no complete checkpoint to load")
        if isinstance(checkpoint, int) and checkpoint not in store.steps():
            raise ConfigError(
                f"{checkpoints}: no checkpoint at step {checkpoint}; it keeps steps "
                f"{store.steps()} (the best and the last)"
            )
        try:
            variables, meta = store.restore_chosen_weights(checkpoint, abstract)
        except Exception as e:  # another model's checkpoints, or only damaged ones
            m, k = config.model, config.data.context_slices
            raise ConfigError(
                f"{checkpoints}: no checkpoint can be read as the config's model (features="
                f"{m.features}, depth={m.depth}, mirror_input={m.get('mirror_input', False)}, "
                f"context_slices={k}): {type(e).__name__}: {str(e)[:500]}"
            ) from e
    finally:
        store.close()
    return variables, meta


def model_from_config(
    config: ml_collections.ConfigDict,
    checkpoints: Path,
    tta: bool | None = None,
    checkpoint: str | int | None = None,
) -> Model:
    """`checkpoint` (None: `config.evaluate.checkpoint`, the best by default) in `checkpoints`
    as the model `config` describes; `tta` None = `config.predict.tta`."""
    variables, meta = restore_variables(config, checkpoints, checkpoint)
    return _model(config, variables, meta["checkpoint_step"], meta, tta)


def _model(config, variables: dict, step, record: dict, tta: bool | None) -> Model:
    """`Model` of `config`'s network and preprocessing with these weights; `tta` None =
    `config.predict.tta`."""
    return Model(
        module=models.create(config, inference=True),
        variables=variables,
        image_size=config.data.image_size,
        normalize=config.data.normalize,
        tta=config.predict.tta if tta is None else tta,
        batch_size=max(1, min(config.eval_batch_size, 32)),
        context_slices=config.data.context_slices,
        step=step,
        record=record,
        config=config,
    )


def load_pretrained(*, tta: bool | None = None) -> Model:
    """The model inside the package (`lggunet.pretrained`, docs/model_card.md); `tta` None =
    its recipe's setting (flip TTA on)."""
    from lggunet import pretrained

    config, variables, record = pretrained.read()
    return _model(config, variables, record.get("step"), record, tta)


def load_ensemble(
    workdir: str | Path, *, tta: bool | None = None, checkpoint: str | None = None
) -> Ensemble:
    """Every fold model of a cross-validation workdir, averaged; all folds must be trained.
    `checkpoint`: each fold's "best" or "last" (None: the run's `evaluate.checkpoint`)."""
    if checkpoint is not None and checkpoint not in configuration.CHECKPOINTS:
        raise ConfigError(
            f"checkpoint={checkpoint!r}: an ensemble takes 'best' or 'last' of each fold"
        )
    workdir = Path(workdir).expanduser()
    if not workdirs.is_cv_workdir(workdir):
        raise ConfigError(
            f"{workdir}: not a cross-validation workdir (no config.json with data.cv_folds >= 2 "
            "and fold_<k>/ folders); load one run with load_model"
        )
    folds = workdirs.cv_folds_of(workdir)
    members = []
    for k in range(folds):
        fold_dir = workdirs.check_fold_trained(workdir, k, folds)
        members.append(load_model(fold_dir, tta=tta, checkpoint=checkpoint))
    return Ensemble(members)


def load_model(
    path: str | Path, *, tta: bool | None = None, checkpoint: str | int | None = None
) -> Model | Ensemble:
    """A trained model with the preprocessing it was trained with.

    `path`: "pretrained" (the model inside the package), a training run's workdir or its
    `checkpoints/` folder (its best checkpoint, built from the run's `config.json`), or a
    cross-validation workdir (the ensemble of its fold models). A folder that happens to be
    called `pretrained` is loaded as `./pretrained`. `tta`: average with the horizontally
    flipped prediction; None = what the run's (or the packaged model's) `predict.tta` says.
    `checkpoint`: "best" (lowest validation loss), "last", a step number (one run only), or
    None: the run's `evaluate.checkpoint` (the best unless its recipe says otherwise); the
    packaged model is one checkpoint and takes None only.
    """
    if str(path) == "pretrained":
        if checkpoint is not None:
            raise ConfigError(
                f"checkpoint={checkpoint!r}: the packaged model is one checkpoint (its training "
                "run's last): leave checkpoint out"
            )
        return load_pretrained(tta=tta)
    checkpoint = check_checkpoint(checkpoint)
    path = Path(path).expanduser()
    if workdirs.is_cv_workdir(path):
        return load_ensemble(path, tta=tta, checkpoint=checkpoint)
    workdir, checkpoints = workdirs.find_checkpoints(path)
    config = configuration.saved_config(workdir)
    if config is None:
        raise ConfigError(
            f"{workdir}: no {configuration.CONFIG_FILE} (runs from before it was written): "
            "use inference.model_from_config(config, checkpoints_dir) with the training config"
        )
    return warn_if_unfinished(
        workdir, model_from_config(config, checkpoints, tta=tta, checkpoint=checkpoint)
    )


def warn_if_unfinished(workdir: Path, model: Model) -> Model:
    """`model`, after a warning when its run has not finished (still training, or stopped):
    its checkpoints are then those of a model half-way through its schedule."""
    if not workdirs.finished(workdir):
        logging.warning(
            "%s: training has not finished (no %s): using checkpoint %s of an unfinished run",
            workdir,
            workdirs.FINAL_METRICS_FILE,
            model.step,
        )
    return model


def load_model_for(
    config: ml_collections.ConfigDict, workdir: str | Path, *, tta: bool | None = None
) -> Model | Ensemble:
    """The best checkpoint of `workdir`, built with the run's saved config.json when there is
    one (else with `config`); the fold ensemble for a cross-validation workdir."""
    if workdirs.is_cv_workdir(workdir):
        return load_ensemble(workdir, tta=tta)
    workdir, checkpoints = workdirs.find_checkpoints(workdir)
    saved = configuration.saved_config(workdir) or configuration.upgrade(config)
    return warn_if_unfinished(workdir, model_from_config(saved, checkpoints, tta=tta))
