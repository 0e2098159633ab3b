"""Post-processing of one patient's binary masks: connected-component filters, and the settings
a model's recipe names for them (its training config's `predict.*`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from lggunet.errors import ConfigError, InputError
from lggunet.inputs import check_threshold


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


def drop_small_components(masks: np.ndarray, min_voxels: int) -> np.ndarray:
    """The masks without their connected components (26-connectivity in 3D, 8 in 2D) of fewer
    than `min_voxels` voxels; 0 keeps every component."""
    masks = np.asarray(masks) > 0
    if min_voxels <= 0 or not masks.any():
        return masks.astype(np.uint8)
    labels, _ = ndimage.label(masks, structure=np.ones((3,) * masks.ndim, bool))
    keep = np.bincount(labels.ravel()) >= min_voxels
    keep[0] = False
    return keep[labels].astype(np.uint8)


def check_min_voxels(min_voxels) -> int:
    """`min_voxels` as an int >= 0; else InputError."""
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int | np.integer):
        raise InputError(f"min_component_voxels={min_voxels!r} must be a whole number >= 0")
    if min_voxels < 0:
        raise InputError(f"min_component_voxels={min_voxels} must be >= 0 (0 = off)")
    return int(min_voxels)


def postprocess(masks: np.ndarray, largest: bool = False, min_voxels: int = 0) -> np.ndarray:
    """One volume's binary masks after the recipe's filters: components under `min_voxels`
    dropped, then (with `largest`) only the largest kept."""
    masks = drop_small_components(masks, min_voxels)
    return largest_component(masks) if largest else masks


def check_flag(value, name: str) -> bool:
    """`value` as a bool (True/False, NumPy's included); InputError naming `name` otherwise
    (a string such as 'False' would otherwise count as true)."""
    if not isinstance(value, bool | np.bool_):
        raise InputError(f"{name}={value!r} must be True or False")
    return bool(value)


def recipe_settings(model: Any) -> tuple[float, bool, int]:
    """(threshold, largest_component, min_component_voxels) that `model`'s recipe predicts
    with: its training config's `predict.*` (an ensemble's first member's); (0.5, False, 0)
    for a model built without a config. ConfigError when the config holds unusable values."""
    member = model.members[0] if hasattr(model, "members") else model
    config = getattr(member, "config", None)
    predict = config.get("predict") if config is not None else None
    if predict is None:
        return 0.5, False, 0
    try:
        return (
            check_threshold(predict.get("threshold", 0.5)),
            check_flag(predict.get("largest_component", False), "largest_component"),
            check_min_voxels(predict.get("min_component_voxels", 0)),
        )
    except InputError as e:
        raise ConfigError(f"the model's recipe (its config's predict.*): {e}") from None
