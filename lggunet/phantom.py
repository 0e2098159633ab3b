"""A synthetic stand-in for `kaggle_3m/`: brain-like ellipses with bright lesions, as TIFFs.

It lets the whole pipeline (builder, training, evaluation) run on a fresh machine with no
download. Numbers measured on it say nothing about real MRI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from lggunet.kaggle3m import FOLDER_NAME

_COMPLETE = ".complete"


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = (x * c + y * s) / rx, (-x * s + y * c) / ry
    return u * u + v * v


def phantom_patient(rng: np.random.Generator, num_slices: int, size: int = 256):
    """(images uint8 (S, size, size, 3), masks uint8 (S, size, size) in {0, 255})."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.normal(0, size * 0.02, 2)
    radii = size * rng.uniform(0.30, 0.38, 2)
    tilt = rng.uniform(-0.3, 0.3)
    has_lesion = rng.random() < 0.85
    lesion_mid = rng.uniform(0.35, 0.65) * num_slices
    lesion_half = rng.uniform(0.12, 0.25) * num_slices
    lesion_r = size * rng.uniform(0.06, 0.13, 2)
    lesion_angle = rng.uniform(0, np.pi)
    lesion_offset = rng.uniform(-0.4, 0.4, 2) * radii
    base = rng.uniform(0.8, 1.2, 3)
    images = np.zeros((num_slices, size, size, 3), np.uint8)
    masks = np.zeros((num_slices, size, size), np.uint8)
    for s in range(num_slices):
        z = (s + 0.5) / num_slices * 2 - 1  # -1..1 through the head
        scale = np.sqrt(max(1 - z * z, 0.05))
        head = _ellipse(yy, xx, *centre, *(radii * scale), tilt)
        brain = head < 1.0
        ventricles = _ellipse(yy, xx, *centre, *(radii * scale * [0.25, 0.12]), tilt) < 1.0
        img = np.zeros((size, size, 3), np.float32)
        img[brain] = [90, 80, 95] * base
        img[ventricles] = [40, 150, 45]
        img[(head >= 0.85) & brain] = [140, 60, 150]  # a brighter rim, like the cortex
        mask = np.zeros((size, size), bool)
        if has_lesion and abs(s - lesion_mid) < lesion_half:
            shrink = np.sqrt(1 - ((s - lesion_mid) / lesion_half) ** 2)
            cy, cx = centre + lesion_offset * scale
            lesion = _ellipse(yy, xx, cy, cx, *(lesion_r * shrink + 1), lesion_angle) < 1.0
            mask = lesion & brain
            img[mask] = [110, 200, 130] * base  # bright on FLAIR (channel 1)
        img += rng.normal(0, 6, img.shape) * brain[..., None]
        images[s] = np.clip(img, 0, 255).astype(np.uint8)
        masks[s] = mask.astype(np.uint8) * 255
    return images, masks


def write_phantom(
    root: str | os.PathLike,
    num_patients: int = 12,
    slices_per_patient: int = 20,
    seed: int = 0,
    size: int = 256,
) -> Path:
    """Writes `root/kaggle_3m/` (once; atomically) and returns that folder.

    Patients are named `TCGA_PH_<nnnn>_20000101` (institution "PH", phantom), with files and
    a `data.csv` laid out as in the Kaggle data set.
    """
    root = Path(root).expanduser()
    target = root / FOLDER_NAME
    if (target / _COMPLETE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".phantom-", dir=root))
    try:
        rng = np.random.default_rng(seed)
        rows = ["Patient,histological_type"]
        for p in range(num_patients):
            case = f"TCGA_PH_{p + 1:04d}_20000101"
            folder = tmp / case
            folder.mkdir()
            images, masks = phantom_patient(rng, slices_per_patient, size)
            for s in range(slices_per_patient):
                tifffile.imwrite(folder / f"{case}_{s + 1}.tif", images[s], photometric="rgb")
                tifffile.imwrite(folder / f"{case}_{s + 1}_mask.tif", masks[s])
            rows.append(f"TCGA_PH_{p + 1:04d},phantom")
        (tmp / "data.csv").write_text("\n".join(rows) + "\n")
        (tmp / _COMPLETE).write_text("")
        if target.exists():  # an earlier, interrupted attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
