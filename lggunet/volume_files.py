"""One patient's predicted volume as files people open: a NIfTI mask in millimetres, a montage
of the tumour-bearing slices, and the tumour's size in voxels, mm^3 and ml.

The Kaggle TIFFs carry no spacing, so it is the user's to give (`Spacing`); where it is not
given, volumes stay in voxels, the NIfTI's voxels are 1 x 1 x 1 with its units left unknown,
and HD95 is in voxels.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
from pathlib import Path

import numpy as np
from absl import logging
from matplotlib.lines import Line2D
from scipy import ndimage

from lggunet import files, plots, volume_metrics
from lggunet.errors import ConfigError

MONTAGE_MAX_SLICES = 30


@dataclasses.dataclass(frozen=True)
class Spacing:
    """Voxel size in millimetres: in-plane pixel side and slice thickness (0 = not known)."""

    pixel_mm: float = 0.0
    thickness_mm: float = 0.0

    def __post_init__(self):
        for name, value in (
            ("pixel_spacing_mm", self.pixel_mm),
            ("slice_thickness_mm", self.thickness_mm),
        ):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and np.isfinite(value) and (value == 0 or 0.01 <= value <= 100)):
                raise ConfigError(
                    f"predict.{name}={value!r}: must be a voxel side in mm, 0.01 to 100 "
                    "(0: unknown)"
                )
        if (self.pixel_mm > 0) != (self.thickness_mm > 0):
            raise ConfigError(
                f"predict.pixel_spacing_mm={self.pixel_mm}, predict.slice_thickness_mm="
                f"{self.thickness_mm}: give both (a voxel's three sides) or neither (0: unknown)"
            )

    @property
    def known(self) -> bool:
        return self.pixel_mm > 0 and self.thickness_mm > 0

    @property
    def voxel_mm3(self) -> float:
        return self.pixel_mm * self.pixel_mm * self.thickness_mm

    @property
    def zyx(self) -> tuple[float, float, float]:
        """Sampling of a (slices, rows, columns) volume: unit voxels when not known."""
        if not self.known:
            return (1.0, 1.0, 1.0)
        return (self.thickness_mm, self.pixel_mm, self.pixel_mm)


def tumour_size(voxels: int, spacing: Spacing) -> dict:
    """`tumour_voxels`, and `tumour_mm3` / `tumour_ml` when the spacing is known (else blank)."""
    if not spacing.known:
        return {"tumour_voxels": int(voxels), "tumour_mm3": "", "tumour_ml": ""}
    mm3 = voxels * spacing.voxel_mm3
    return {
        "tumour_voxels": int(voxels),
        "tumour_mm3": float(f"{mm3:.7g}"),  # significant digits: tiny voxels stay non-zero
        "tumour_ml": float(f"{mm3 / 1000.0:.7g}"),
    }


def affine(spacing: Spacing) -> np.ndarray:
    """The NIfTI (RAS+) affine of `nifti_array`'s (x = column, y = row, z = slice) grid, the
    voxel size on its diagonal (1 where unknown), origin at the first voxel. The TIFFs record
    no orientation; this assumes the radiological display of the Kaggle slices (image top =
    anterior, image right = the patient's left), so x and y run towards the patient's left
    and posterior (negative), and slice numbers towards superior (assumed)."""
    x, y, z = (
        (spacing.pixel_mm, spacing.pixel_mm, spacing.thickness_mm) if spacing.known else (1, 1, 1)
    )
    return np.diag([-float(x), -float(y), float(z), 1.0])


def nifti_array(masks: np.ndarray) -> np.ndarray:
    """(slices, rows, columns) -> NIfTI's (x, y, z) = (columns, rows, slices), uint8."""
    return np.ascontiguousarray(np.transpose(np.asarray(masks, np.uint8), (2, 1, 0)))


def write_nifti(path: Path, masks: np.ndarray, spacing: Spacing) -> None:
    """The stacked mask (slices in the given order, values 0/1) as `.nii.gz`, atomically."""
    import nibabel as nib

    image = nib.Nifti1Image(nifti_array(masks), affine(spacing))
    header = image.header
    header.set_xyzt_units(xyz="mm" if spacing.known else "unknown")
    header["descrip"] = (
        b"lggunet predicted tumour mask"
        if spacing.known
        else b"lggunet predicted tumour mask; voxel spacing unknown (1 x 1 x 1)"
    )
    header.set_qform(affine(spacing), code=1)
    header.set_sform(affine(spacing), code=1)
    files.write_atomic(path, gzip.compress(image.to_bytes(), mtime=0))


def _outline(mask: np.ndarray) -> np.ndarray:
    mask = mask > 0
    return mask & ~ndimage.binary_erosion(mask)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """FLAIR (channel 1) in grey with the predicted outline red and the true one green."""
    rgb = np.repeat(image[..., 1:2], 3, axis=-1).copy()
    if truth is not None:
        rgb[_outline(truth)] = (0, 255, 0)
    rgb[_outline(pred)] = (255, 0, 0)
    return rgb


def montage_slices(preds: list[np.ndarray], truths: list[np.ndarray | None]) -> list[int]:
    """Indices of the slices with predicted or true tumour (every slice when none has any),
    at most MONTAGE_MAX_SLICES of them, evenly spread."""
    chosen = [
        i
        for i, (p, t) in enumerate(zip(preds, truths, strict=True))
        if p.any() or (t is not None and t.any())
    ]
    if not chosen:
        chosen = list(range(len(preds)))
    if len(chosen) > MONTAGE_MAX_SLICES:
        picks = np.linspace(0, len(chosen) - 1, MONTAGE_MAX_SLICES).round().astype(int)
        chosen = [chosen[i] for i in picks]
    return chosen


def write_montage(
    path: Path,
    title: str,
    images: list[np.ndarray],
    preds: list[np.ndarray],
    truths: list[np.ndarray | None],
    numbers: list[int],
) -> None:
    """The tumour-bearing slices (FLAIR) in a grid, predicted outline red, true green, each
    labelled with its slice number; a legend says which is which."""
    chosen = montage_slices(preds, truths)
    total = sum(
        1 for p, t in zip(preds, truths, strict=True) if p.any() or (t is not None and t.any())
    )
    cols = min(6, len(chosen))
    rows = -(-len(chosen) // cols)
    fig = plots.figure(figsize=(2.2 * cols, 2.5 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    has_truth = False
    for ax, i in zip(axes.ravel(), chosen, strict=False):
        has_truth |= truths[i] is not None
        ax.imshow(overlay(images[i], preds[i], truths[i]))
        ax.set_title(f"slice {numbers[i]}", fontsize=8)
    if total == 0:
        what = f"no tumour predicted: all {len(chosen)} slices shown"
    elif total > len(chosen):
        what = f"{len(chosen)} of the {total} slices with tumour"
    else:
        what = f"the {total} slice{'s' if total != 1 else ''} with tumour"
    fig.suptitle(f"{title}: {what}", fontsize=10)
    legend = [Line2D([], [], color="red", label="predicted")]
    if has_truth:
        legend.append(Line2D([], [], color="lime", label="ground truth"))
    fig.legend(
        handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False
    )
    files.write_atomic(path, lambda p: fig.savefig(p, dpi=80, format="png"))


CSV_FIELDS = [
    "patient",
    "folder",
    "slices",
    "missing_slices",
    "slices_with_tumour",
    "tumour_voxels",
    "tumour_mm3",
    "tumour_ml",
    "true_voxels",
    "dice",
    "hd95_voxels",
    "hd95_mm",
    "copied_channels",
    "pixel_spacing_mm",
    "slice_thickness_mm",
]


def truth_scores(preds, truths, complete: bool, spacing: Spacing) -> dict:
    """`true_voxels`, `dice`, `hd95_voxels` and (spacing known) `hd95_mm` of one volume;
    blank unless every slice was predicted and had its ground truth. HD95 is blank where
    either mask is empty (undefined)."""
    blank = {"true_voxels": "", "dice": "", "hd95_voxels": "", "hd95_mm": ""}
    if not complete or any(t is None for t in truths):
        return blank
    truth, pred = np.stack(truths) > 0, np.stack(preds) > 0
    hd_voxels = volume_metrics.hd95(truth, pred)
    hd_mm = volume_metrics.hd95(truth, pred, spacing.zyx) if spacing.known else float("nan")

    def shown(x):
        return "" if not np.isfinite(x) else round(float(x), 4)

    return {
        "true_voxels": int(truth.sum()),
        "dice": round(volume_metrics.dice(truth, pred), 6),
        "hd95_voxels": shown(hd_voxels),
        "hd95_mm": shown(hd_mm),
    }


def spacing_columns(spacing: Spacing) -> dict:
    """The spacing the row's millimetres come from (blank: not given)."""
    if not spacing.known:
        return {"pixel_spacing_mm": "", "slice_thickness_mm": ""}
    return {"pixel_spacing_mm": spacing.pixel_mm, "slice_thickness_mm": spacing.thickness_mm}


def write_csv(path: Path, rows: list[dict]) -> None:
    """volumes.csv, atomically: one row per patient, CSV_FIELDS in order."""

    def write(p):
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, write)


def warn_partial(patient: str, slices: int, truths: list) -> None:
    """Warnings for a volume that predicts or scores otherwise than a whole labelled scan."""
    labelled = sum(t is not None for t in truths)
    if 0 < labelled < len(truths):
        logging.warning(
            "%s: %d of %d slices have a usable _mask.tif: no Dice (it needs every slice's)",
            patient,
            labelled,
            len(truths),
        )
    if slices < 10:
        logging.warning(
            "%s: %d slice(s) only: the per-patient normalisation takes its statistics from "
            "them, not from the whole scan; predict the patient's whole folder for masks as "
            "the model was scored",
            patient,
            slices,
        )


def log_volume(patient: str, copied: str, slices_read: int, tumour: int, done, total) -> None:
    """The progress line of one predicted volume; a warning for a scan whose three channels
    hold one image (the weakest group in cross-validation)."""
    if copied == "all three":
        logging.warning(
            "%s: all three channels hold the same image (modalities missing and copied); "
            "the 4 such scans of the 49 scored 0.71 mean per-volume Dice in the "
            "shipped recipe's cross-validation, against 0.78 for all (two seeds; RESULTS.md): "
            "check its masks",
            patient,
        )
    logging.info(
        "%s: %d slices, %d with tumour (%d/%d images done)",
        *(patient, slices_read, tumour, done, total),
    )
