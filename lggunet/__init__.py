"""lggunet: 2D U-Nets for brain tumour (LGG) segmentation on MRI, in JAX/Flax.

    import lggunet
    model = lggunet.load_model("pretrained")            # packaged; or a run's workdir
    patient = lggunet.read_patient("TCGA_CS_4941_19960909/")
    masks = lggunet.predict(patient.images, model)      # (N, H, W) uint8 in {0, 1}
    lggunet.volume_dice(patient.masks, masks)           # per-volume Dice

The command line (`python run.py` or `lggunet`) trains, evaluates and predicts; the modules
(`lggunet.models`, `lggunet.steps`, `lggunet.losses`, `lggunet.metrics`, `lggunet.dataset`,
...) are the pieces for research code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import numpy as np

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "Model",
    "Patient",
    "__version__",
    "configs",
    "load_model",
    "predict",
    "read_patient",
    "volume_dice",
]

if TYPE_CHECKING:  # for type checkers; at run time these load on first use (import is light)
    from lggunet import configs
    from lggunet.inference import Ensemble, Model
    from lggunet.scans import Patient

_LAZY = {
    "Model": ("lggunet.inference", "Model"),
    "Ensemble": ("lggunet.inference", "Ensemble"),
    "Patient": ("lggunet.scans", "Patient"),
    "configs": ("lggunet.configs", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lggunet' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    loaded = importlib.import_module(module)
    return loaded if attribute is None else getattr(loaded, attribute)


def load_model(
    path: str = "pretrained", *, tta: bool | None = None, checkpoint: str | int | None = None
) -> Model | Ensemble:
    """A trained model with the preprocessing it was trained with.

    `path`: "pretrained" (the model inside the package, docs/model_card.md), a training
    run's workdir (the checkpoint it chose), or a cross-validation workdir (its fold models
    averaged). `tta`: also average with the horizontally flipped slices; None = the run's
    own `predict.tta` (on for the packaged model). `checkpoint`: "best" (lowest validation
    loss), "last" (the newest), or a step number of a run's kept checkpoints (a run keeps the
    best and the last); None = the run's `evaluate.checkpoint` (the best by default; the last
    for `configs/cpu.py`). The packaged model is one checkpoint: leave `checkpoint` out.
    Reads only the weights.
    """
    from lggunet import inference

    return inference.load_model(path, tta=tta, checkpoint=checkpoint)


def read_patient(folder: str) -> Patient:
    """One patient's folder of Kaggle-style TIFFs (or a zip of it), slices in numeric order:
    `.images` (N, H, W, 3) uint8 (pre-contrast, FLAIR, post-contrast; 0..255), `.masks`
    (N, H, W) uint8 in {0, 1} when every slice has its `_mask.tif` (else None),
    `.slice_numbers`, `.files`. A DataError names the file when something cannot be read."""
    from lggunet import scans

    return scans.read_patient(folder)


def predict(
    images: np.ndarray,
    model: Model | Ensemble,
    *,
    threshold: float | None = None,
    largest_connected_component: bool | None = None,
    min_component_voxels: int | None = None,
    scale: float | None = None,
    volume_mean: np.ndarray | None = None,
    volume_std: np.ndarray | None = None,
    brain_stats: np.ndarray | None = None,
) -> np.ndarray:
    """Binary tumour masks for MRI slices.

    images: (N, H, W, 3) or one (H, W, 3) slice, channels pre-contrast, FLAIR, post-contrast;
        uint8 in 0..255 as in the TIFFs, or float with `scale`, the factor that brings them
        to 0..255 (scale=255 for images in [0, 1], scale=1 for floats already on 0..255).
        Any H, W (resized to the model's input, masks mapped back). Pass one patient's
        slices together: the model normalises with the volume's statistics. A 2.5D model
        (`data.context_slices` > 0) reads each slice with the ones beside it: give it a
        volume's slices in order (one (H, W, 3) slice is refused).
    model: `load_model(...)`.
    threshold: p(tumour) above which a pixel is tumour, in (0, 1).
    largest_connected_component: keep only the largest 3D component (the slices taken as
        one volume in order).
    min_component_voxels: drop 3D components smaller than this (26-connected; 0 = keep all).
    threshold, largest_connected_component, min_component_voxels: None (the default) = what
        the model's recipe predicts with (its training config's `predict.*`, as
        `--mode=predict` uses them; the packaged model: 0.5, no, 500). The component filters
        need the whole volume, so for one (H, W, 3) slice the recipe's are not applied; a
        (1, H, W, 3) array is a volume of one slice, and they are.
    volume_mean, volume_std ((3,) or (N, 3)), brain_stats ((6, 3) or (N, 6, 3)): the
        patient's statistics for the per-patient normalisations, when `images` are not the
        whole volume (see `lggunet.normalization`); by default those of `images`.

    Returns (N, H, W) (or (H, W)) uint8 in {0, 1}. Probabilities: `model(images)`, float32 in
    [0, 1]. Bad input (NaN, channels first, wrong dtype) raises an InputError saying why.
    """
    from lggunet import inference

    return inference.predict(
        images,
        model,
        threshold=threshold,
        largest_connected_component=largest_connected_component,
        min_component_voxels=min_component_voxels,
        scale=scale,
        volume_mean=volume_mean,
        volume_std=volume_std,
        brain_stats=brain_stats,
    )


def volume_dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two binary volumes (equal shapes; masks in {0, 1}, {0, 255} or bool):
    2|T&P| / (|T| + |P|), 1.0 when both are empty. The literature's per-volume Dice is this
    per patient. Probabilities are refused: threshold them first (`predict` does)."""
    from lggunet import volume_metrics

    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"volume_dice: shapes differ, {true.shape} and {pred.shape}")
    for name, mask in (("true", true), ("pred", pred)):
        if len(np.unique(mask)) > 2 or (mask.dtype.kind == "f" and not np.isin(mask, (0, 1)).all()):
            raise ValueError(
                f"volume_dice: {name} is not a binary mask (values {np.unique(mask)[:4]}...); "
                "threshold probabilities first, e.g. lggunet.predict"
            )
    return volume_metrics.dice(true, pred)
