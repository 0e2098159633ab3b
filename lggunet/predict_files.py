"""`--mode=predict`: masks for new scans on disk.

The input is one .tif slice, a patient folder, a kaggle_3m-style folder of patient folders, or
a zip of any of these. For every image `<rel>/<stem>.tif` (files named `*_mask.tif` are ground
truth and are skipped) it writes `OUT/<rel>/<stem>_pred_mask.tif` (uint8 in {0, 255}, the
input's height and width) and `OUT/<rel>/<stem>_overlay.png` (FLAIR with the predicted outline
in red, and the ground truth in green when a `<stem>_mask.tif` lies beside it). Per patient
(volume) it writes `<patient>_pred_mask.nii.gz` (the slices stacked in numeric order, with the
voxel spacing in its affine) and `<patient>_montage.png` (the tumour-bearing slices), then
`OUT/volumes.csv`: per patient, slices, slices with tumour, tumour voxels (and mm^3 and ml
when the spacing is given) and, when every slice of the volume has its ground truth beside
it, the true voxels, the per-volume Dice (the literature's metric) and HD95 of the written
masks (`lggunet.volume_files`).

A file that cannot be used (unreadable, wrong channel count, a patient whose slices differ in
size, ...) is reported by name and skipped; the rest are still processed, and the result
lists the failures.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from absl import logging
from PIL import Image

from lggunet import (
    files,
    inference,
    kaggle3m,
    normalization,
    postprocessing,
    scans,
    slices,
    volume_files,
    walk,
    workdirs,
)
from lggunet.errors import ConfigError, DataError


@dataclasses.dataclass
class PredictResult:
    written: list[Path] = dataclasses.field(default_factory=list)  # every file written
    failures: list[str] = dataclasses.field(default_factory=list)
    volumes: list[dict] = dataclasses.field(default_factory=list)  # volumes.csv's rows
    images: int = 0  # images found in the input
    masks_written: int = 0  # images whose mask (and overlay) were written
    nifti_written: int = 0
    montages_written: int = 0

    def summary(self, output: str | os.PathLike) -> str:
        """One line: what was found, what was written where, how many failed."""

        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        return (
            f"{self.masks_written} of {self.images} images predicted for "
            f"{n(len(self.volumes), 'patient')}: {n(self.masks_written, 'mask')} + "
            f"{n(self.masks_written, 'overlay')}, {n(self.nifti_written, 'NIfTI volume')}, "
            f"{n(self.montages_written, 'montage')} and volumes.csv in {output}; "
            f"{n(len(self.failures), 'failure')}"
        )


def read_slice(data: bytes, where: str) -> np.ndarray:
    """One (H, W, 3) uint8 slice from TIFF bytes, or a DataError naming the file."""
    return slices.read_image(data, where)


overlay = volume_files.overlay  # FLAIR in grey, predicted outline red, true green
_SLICE_OUTPUT = re.compile(r"^(.+)_(pred_mask\.tif|overlay\.png)$")  # a slice's outputs


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, write)


def _fail(result: PredictResult, message: str) -> None:
    result.failures.append(message)
    logging.error("%s", message)


def _load(
    items: list[scans.InputFile], result: PredictResult
) -> list[tuple[scans.InputFile, np.ndarray]]:
    """The volume's slices that read; each that does not is a named failure."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, read_slice(item.read(), item.where)))
        except Exception as e:  # a bad file, a bad zip member: name it, go on
            _fail(result, str(e) if isinstance(e, DataError) else f"{item.where}: {e!r}")
    return loaded


def _one_size(patient: str, loaded: list, result: PredictResult) -> bool:
    """True when the volume's slices share one size; else a failure naming the sizes (a
    volume's mask, volume and HD95 need one grid)."""
    sizes = collections.Counter(a.shape[:2] for _, a in loaded)
    if len(sizes) == 1:
        return True
    odd = next(it.where for it, a in loaded if a.shape[:2] != sizes.most_common(1)[0][0])
    listed = ", ".join(f"{h}x{w} in {n}" for (h, w), n in sizes.most_common())
    _fail(
        result,
        f"{patient}: slices of different sizes in one patient ({listed}; e.g. {odd}): "
        "not predicted",
    )
    return False


def _stack_problem(model, items: list, loaded: list) -> str:
    """Why a 2.5D model (each slice read with its neighbours) cannot predict this volume: its
    slice order unknown or broken, or a slice unread; "" when it can (or the model is 2D)."""
    members = getattr(model, "members", [model])
    k = max(member.context_slices for member in members)
    if not k:
        return ""
    why = scans.order_problem(items) or (
        f"{len(items) - len(loaded)} of its {len(items)} slices unread"
        if len(loaded) < len(items)
        else ""
    )
    return why and f"{why}, and the 2.5D model (context_slices={k}) needs every slice in order"


def _predict_volume(
    model, arrays: list[np.ndarray], threshold: float, lcc: bool, min_voxels: int
) -> list:
    """One volume's binary masks, its statistics taken over all its slices (whichever
    normalisation the model, or each member, uses), post-processed as a volume."""
    mean, std = kaggle3m.volume_statistics(arrays)
    brain = normalization.brain_statistics(arrays)
    probs = model(np.stack(arrays), mean, std, brain)
    preds = (probs > threshold).astype(np.uint8)
    return list(postprocessing.postprocess(preds, lcc, min_voxels))


@dataclasses.dataclass
class _Outputs:
    """Where each image's outputs go, never onto an input file."""

    output: Path
    images: list[scans.InputFile]
    masks: dict
    result: PredictResult
    spacing: volume_files.Spacing

    def __post_init__(self):
        self.volume_names: set[tuple[PurePosixPath, str]] = set()
        self.this_run: set[Path] = set()  # slice outputs written: never cleared as earlier
        self.inputs = {os.path.realpath(it.where) for it in self.images} | {
            os.path.realpath(where) for _, where in self.masks.values()
        }
        # x_12.tif and x_12.tiff (or X_12.TIF) would write the same outputs: such images keep
        # their extension in the output names (x_12_tif_pred_mask.tif, x_12_tiff_pred_mask.tif).
        self.clashes = collections.Counter(
            (it.rel.parent, it.rel.stem.lower()) for it in self.images
        )

    def paths(self, rel: PurePosixPath) -> tuple[Path, Path]:
        """(the predicted mask's path, the overlay's)."""
        unique = self.clashes[(rel.parent, rel.stem.lower())] == 1
        stem = rel.stem if unique else rel.name.replace(".", "_")
        out_dir = self.output / Path(*rel.parent.parts)
        return out_dir / f"{stem}_pred_mask.tif", out_dir / f"{stem}_overlay.png"

    def truth(self, item: scans.InputFile, shape: tuple) -> np.ndarray | None:
        """The slice's ground truth; None when it has none, or (a named failure) when it
        cannot be used: the outline and the volume's Dice are then left out."""
        if item.mask_key is None:
            return None
        reader, where = self.masks[item.mask_key]
        try:
            truth = read_mask_bytes(reader(), where)
        except Exception as e:
            _fail(self.result, f"{e if isinstance(e, DataError) else f'{where}: {e!r}'}; no Dice")
            return None
        if truth.shape != shape:
            _fail(self.result, f"{where}: mask is {truth.shape}, its image {shape}; no Dice")
            return None
        return truth

    def write_volume(self, loaded: list, preds: list) -> dict:
        """Writes each slice's mask and overlay; the volume's counts (slices written, with
        tumour, tumour voxels) and each slice's ground truth (None where it has none)."""
        counts = {"slices": 0, "tumour_slices": 0, "voxels": 0, "truths": []}
        for (item, image), pred in zip(loaded, preds, strict=True):
            mask_path, png = self.paths(item.rel)
            if {os.path.realpath(mask_path), os.path.realpath(png)} & self.inputs:
                _fail(
                    self.result,
                    f"{mask_path}: is an input file; not overwritten (choose another --output)",
                )
                continue
            truth = self.truth(item, pred.shape)
            target = mask_path
            try:
                _write_atomic(mask_path, lambda p, m=pred: tifffile.imwrite(p, m * np.uint8(255)))
                target = png
                _write_atomic(
                    png,
                    lambda p, i=image, m=pred, t=truth: Image.fromarray(overlay(i, m, t)).save(
                        p, format="PNG"
                    ),
                )
            except OSError as e:
                _fail(self.result, f"{target}: cannot write ({e.strerror or e})")
                self.remove([mask_path, png])  # a slice's outputs are both there or neither
                continue
            self.result.written += [mask_path, png]
            self.this_run.update((mask_path, png))
            self.result.masks_written += 1
            counts["truths"].append(truth)
            counts["slices"] += 1
            counts["tumour_slices"] += int(pred.any())
            counts["voxels"] += int(pred.sum())
        return counts

    def unique_name(self, folder: PurePosixPath, name: str) -> str:
        """The volume's name in volumes.csv and its files, made unique in its folder (a
        folder of case X that also holds files of no case: X and X_volume2)."""
        unique, n = name, 1
        while (folder, unique) in self.volume_names:
            n += 1
            unique = f"{name}_volume{n}"
        self.volume_names.add((folder, unique))
        return unique

    def paths_3d(self, folder: PurePosixPath, stem: str) -> tuple[Path, Path]:
        """(the volume's NIfTI mask, its montage)."""
        out_dir = self.output / Path(*folder.parts)
        return out_dir / f"{stem}_pred_mask.nii.gz", out_dir / f"{stem}_montage.png"

    def remove(self, paths: list[Path]) -> None:
        """Deletes those of `paths` that exist and are not inputs; one that cannot go is a
        named failure (it would pass for this run's output)."""
        for path in paths:
            if os.path.realpath(path) in self.inputs or not os.path.lexists(path):
                continue
            try:
                path.unlink()
            except OSError as e:
                _fail(self.result, f"{path}: an earlier output that cannot be removed ({e})")

    def clear_earlier(self, folder: PurePosixPath, series: str, stem: str) -> None:
        """Removes what an earlier prediction into OUT left for this volume: the slice masks
        and overlays of its series (a slice since lost included), its NIfTI and montage.
        Every output of it there is then this run's; one this run cannot write is absent,
        never an old one."""
        out_dir = self.output / Path(*folder.parts)
        ours = [
            path
            for path in (out_dir.iterdir() if out_dir.is_dir() else [])
            if (m := _SLICE_OUTPUT.match(path.name))
            and scans.series_name(PurePosixPath(f"{m[1]}.tif")) == series
            and path not in self.this_run
        ]
        self.remove(sorted(ours) + list(self.paths_3d(folder, stem)))

    def write_3d(self, folder: PurePosixPath, stem: str, loaded, preds, truths) -> None:
        """The volume's NIfTI mask and montage; a failure names what could not be written."""
        patient = stem
        nifti, montage = self.paths_3d(folder, stem)
        out_dir = nifti.parent
        numbers = [scans.slice_number(item.rel)[0] for item, _ in loaded]
        try:
            volume_files.write_nifti(nifti, np.stack(preds), self.spacing)
            self.result.written.append(nifti)
            self.result.nifti_written += 1
            volume_files.write_montage(
                montage, patient, [a for _, a in loaded], preds, truths, numbers
            )
            self.result.written.append(montage)
            self.result.montages_written += 1
        except OSError as e:
            _fail(
                self.result,
                f"{walk.shown(e.filename or out_dir)}: cannot write ({e.strerror or e})",
            )
        except Exception as e:  # nibabel refusing a header value: name it, go on
            _fail(self.result, f"{out_dir / stem}: volume files not written ({e})")


def predict_path(
    model: inference.Model | inference.Ensemble,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    threshold: float = 0.5,
    largest_connected_component: bool = False,
    min_component_voxels: int = 0,
    spacing: volume_files.Spacing | None = None,
) -> PredictResult:
    """Predicts every image under `input_path` into `output` (see the module docstring);
    `spacing` (mm) gives volumes in mm^3 and ml, HD95 in mm and the NIfTI's voxel size."""
    threshold = inference.check_threshold(threshold)
    min_component_voxels = postprocessing.check_min_voxels(min_component_voxels)
    spacing = spacing or volume_files.Spacing()
    output = Path(output).expanduser()
    workdirs.make_writable_dir(output, "--output")
    images, masks, problems = scans.collect_inputs(input_path)
    try:  # written last: it never lists an earlier run's patients beside this run's files
        (output / "volumes.csv").unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"{output / 'volumes.csv'}: cannot replace it ({e.strerror or e})") from e
    result = PredictResult(images=len(images))
    for message in problems:
        _fail(result, message)
    for where in scans.orphan_masks(images, masks):
        _fail(result, f"{where}: a ground-truth mask without its image (a slice missing?)")
    outputs = _Outputs(output, images, masks, result, spacing)
    orphans = scans.orphan_keys(images, masks)
    done = 0
    groups = scans.volumes(images)
    scans.warn_repeated_cases(groups)
    for (folder, series), items in groups.items():
        name = scans.volume_name(groups, folder, series, Path(input_path).expanduser())
        patient = outputs.unique_name(folder, name)
        outputs.clear_earlier(folder, series, patient)
        loaded = _load(items, result)
        done += len(items)
        if not loaded or not _one_size(patient, loaded, result):
            continue
        problem = _stack_problem(model, items, loaded)
        if problem:
            _fail(result, f"{patient}: {problem}: not predicted")
            continue
        arrays = [a for _, a in loaded]
        preds = _predict_volume(
            model, arrays, threshold, largest_connected_component, min_component_voxels
        )
        counts = outputs.write_volume(loaded, preds)
        if not counts["slices"]:  # nothing of this volume written: no row to mislead
            continue
        absent = scans.absent_numbers(items, orphans)
        why = _incomplete(items, counts["slices"], absent)
        complete = not why
        if complete:
            outputs.write_3d(folder, patient, loaded, preds, counts["truths"])
        else:
            _fail(result, f"{patient}: {why}: no NIfTI volume, montage or Dice for it")
        volume_files.warn_partial(patient, len(items), counts["truths"])
        copied = kaggle3m.copied_channels(arrays)
        result.volumes.append(
            {
                "patient": patient,
                "folder": folder.as_posix(),
                "slices": counts["slices"],
                "missing_slices": len(items) - counts["slices"] + len(absent),
                "slices_with_tumour": counts["tumour_slices"],
                **volume_files.tumour_size(counts["voxels"], spacing),
                **volume_files.truth_scores(preds, counts["truths"], complete, spacing),
                "copied_channels": copied,
                **volume_files.spacing_columns(spacing),
            }
        )
        volume_files.log_volume(
            patient, copied, len(loaded), counts["tumour_slices"], done, len(images)
        )
    volume_files.write_csv(output / "volumes.csv", result.volumes)
    result.written.append(output / "volumes.csv")
    return result


def _incomplete(items: list, written: int, absent: list[int]) -> str:
    """Why a volume gets no NIfTI, montage or Dice ("" when it is whole): its slice order not
    known, numbers missing from it, or slices not predicted."""
    if order := scans.order_problem(items):
        return order
    if absent:
        return f"slice(s) {slices.listed(absent)} missing (a mask lost its image)"
    if written < len(items):
        return f"{len(items) - written} of its {len(items)} slices could not be predicted (above)"
    return ""


def read_mask_bytes(data: bytes, where: str) -> np.ndarray:
    """A ground-truth mask (H, W) in {0, 1}, through the same guarded reader."""
    return slices.read_mask(data, where, strict=False)
