"""`--mode=predict`: masks for new scans on disk.

The input is one .tif slice, a patient folder, a kaggle_3m-style folder of patient folders, or
a zip of any of these. For every image `<rel>/<stem>.tif` (files named `*_mask.tif` are ground
truth and are skipped) it writes `OUT/<rel>/<stem>_pred_mask.tif` (uint8 in {0, 255}, the
input's height and width) and `OUT/<rel>/<stem>_overlay.png` (FLAIR with the predicted outline
in red, and the ground truth in green when a `<stem>_mask.tif` lies beside it), then
`OUT/volumes.csv`: per patient (folder), slices, slices with tumour, tumour area in pixels,
and, when every slice of the volume has its ground truth beside it, the true area and the
per-volume Dice (the literature's metric) of the written masks.

A file that cannot be used (unreadable, wrong channel count, ...) is reported by name and
skipped; the rest are still processed, and the result lists the failures.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from absl import logging
from PIL import Image
from scipy import ndimage

from lggunet import files, inference, kaggle3m, normalization, slices, walk, workdirs
from lggunet.errors import DataError

_TIF = re.compile(r"\.tiff?$", re.IGNORECASE)
_MASK = re.compile(r"_mask\.tiff?$", re.IGNORECASE)
_SLICE_NUMBER = re.compile(r"_(\d+)\.tiff?$", re.IGNORECASE)
_OUR_MASK = re.compile(r"_pred_mask\.tif$")


@dataclasses.dataclass(frozen=True)
class InputFile:
    rel: PurePosixPath  # relative path of the image, used for the outputs
    read: object  # () -> bytes
    where: str  # for messages
    mask_key: tuple[str, str] | None = None  # its ground truth's key in the masks, if any


@dataclasses.dataclass
class PredictResult:
    written: list[Path] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    volumes: list[dict] = dataclasses.field(default_factory=list)


MAX_FILE_BYTES = slices.MAX_FILE_BYTES


def _wanted(name: str) -> bool:
    """A .tif that is not macOS metadata (`__MACOSX/`, `._name.tif`) nor a mask this command
    wrote before (`*_pred_mask.tif`: predicting into the input folder twice)."""
    parts = PurePosixPath(name).parts
    return (
        bool(_TIF.search(name))
        and "__MACOSX" not in parts
        and not PurePosixPath(name).name.startswith("._")
        and not _OUR_MASK.search(name)
    )


def _image_key(rel: PurePosixPath) -> tuple[str, str]:
    return (rel.parent.as_posix().lower(), _TIF.sub("", rel.name).lower())


def _mask_key(rel: PurePosixPath) -> tuple[str, str]:
    return (rel.parent.as_posix().lower(), _MASK.sub("", rel.name).lower())


def collect_inputs(path: str | os.PathLike) -> tuple[list[InputFile], dict, list[str]]:
    """(images to predict, {key: (reader, where)} of ground-truth masks, problems found while
    listing).
    Paths are relative to the input folder (to the file's folder for one file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    problems: list[str] = []
    files: dict[PurePosixPath, tuple[object, str]] = {}
    if path.is_file() and zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        for info in archive.infolist():
            if info.is_dir() or not _wanted(info.filename):
                continue
            rel = slices.safe_member(info.filename)
            where = walk.shown(f"{path}!{info.filename}")
            if rel is None:
                problems.append(f"{where}: path leaves the output folder; skipped")
            elif rel in files:
                problems.append(
                    f"{where}: the same file as {files[rel][1]} (one output path); skipped"
                )
            elif info.file_size > MAX_FILE_BYTES:
                problems.append(f"{where}: {info.file_size} bytes unpacked, not a slice; skipped")
            else:
                files[rel] = (lambda info=info: archive.read(info), where)
    elif not path.is_dir():  # one image (read carefully: it may be a FIFO or huge)
        if not _TIF.search(path.name):
            raise DataError(f"{walk.shown(path)}: not a .tif image, a folder or a zip")
        for sibling in [path, *path.parent.iterdir()]:  # its ground truth, for the overlay
            rel = PurePosixPath(sibling.name)
            if sibling == path or _mask_key(rel) == _image_key(PurePosixPath(path.name)):
                files[rel] = (functools.partial(walk.read_file, sibling), walk.shown(sibling))
    else:
        found, problems = walk.list_files(path, lambda rel: _wanted(rel.as_posix()))
        for f in found:
            files[f.rel] = (functools.partial(walk.read_file, f.path), walk.shown(f.path))
    masks = {_mask_key(rel): entry for rel, entry in files.items() if _MASK.search(rel.name)}
    images = []
    for rel, (reader, where) in sorted(files.items()):
        if _MASK.search(rel.name):
            continue
        key = _image_key(rel)
        images.append(InputFile(rel, reader, where, key if key in masks else None))
    if not images:
        raise DataError(
            f"{path}: no .tif images to predict on (files named *_mask.tif are skipped)"
        )
    return images, masks, problems


def read_slice(data: bytes, where: str) -> np.ndarray:
    """One (H, W, 3) uint8 slice from TIFF bytes, or a DataError naming the file."""
    return slices.read_image(data, where)


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


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, write)


def _root_name(path: Path) -> str:
    """The patient of images lying directly in the input: the folder's (or file's folder's)
    name, or the zip's stem."""
    if path.is_dir():
        return path.resolve().name
    if zipfile.is_zipfile(path):
        return path.stem
    return path.resolve().parent.name


def _slice_number(rel: PurePosixPath) -> tuple[int, str]:
    m = _SLICE_NUMBER.search(rel.name)
    return (int(m.group(1)) if m else 0, rel.name)


def _fail(result: PredictResult, message: str) -> None:
    result.failures.append(message)
    logging.error("%s", message)


def _load(items: list[InputFile], result: PredictResult) -> list[tuple[InputFile, np.ndarray]]:
    """The volume's slices that read; each that does not is a named failure."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, read_slice(item.read(), item.where)))
        except Exception as e:  # a bad file, a bad zip member: name it, go on
            _fail(result, str(e) if isinstance(e, DataError) else f"{item.where}: {e!r}")
    return loaded


def _predict_volume(model, arrays: list[np.ndarray], threshold: float, lcc: bool) -> list:
    """One volume's binary masks, its statistics taken over all its slices (whichever
    normalisation the model, or each member, uses); slices of one size predicted at once."""
    mean, std = kaggle3m.volume_statistics(arrays)
    brain = normalization.brain_statistics(arrays)
    preds: list = [None] * len(arrays)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        probs = model(np.stack([arrays[i] for i in idx]), mean, std, brain)
        for i, p in zip(idx, probs, strict=True):
            preds[i] = (p > threshold).astype(np.uint8)
    if lcc and len({p.shape for p in preds}) == 1:
        return list(inference.largest_component(np.stack(preds)))
    return [inference.largest_component(p) for p in preds] if lcc else preds


@dataclasses.dataclass
class _Outputs:
    """Where each image's outputs go, never onto an input file."""

    output: Path
    images: list[InputFile]
    masks: dict
    result: PredictResult

    def __post_init__(self):
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

    def truth(self, item: InputFile, shape: tuple) -> np.ndarray | None:
        if item.mask_key is None:
            return None
        try:
            truth = read_mask_bytes(self.masks[item.mask_key][0](), item.where)
        except Exception:  # a broken ground truth only loses the green outline
            return None
        return truth if truth.shape == shape else None

    def write_volume(self, loaded: list, preds: list) -> dict:
        """Writes each slice's mask and overlay; the volume's counts (slices written, with
        tumour, tumour pixels, and the overlap with the truth for its Dice)."""
        counts = {"slices": 0, "tumour_slices": 0, "area": 0}
        overlap = {"intersection": 0, "true": 0, "complete": True}
        for (item, image), pred in zip(loaded, preds, strict=True):
            mask_path, png = self.paths(item.rel)
            if {os.path.realpath(mask_path), os.path.realpath(png)} & self.inputs:
                _fail(
                    self.result,
                    f"{mask_path}: is an input file; not overwritten (choose another --output)",
                )
                overlap["complete"] = False
                continue
            truth = self.truth(item, pred.shape)
            try:
                _write_atomic(mask_path, lambda p, m=pred: tifffile.imwrite(p, m * np.uint8(255)))
                _write_atomic(
                    png,
                    lambda p, i=image, m=pred, t=truth: Image.fromarray(overlay(i, m, t)).save(
                        p, format="PNG"
                    ),
                )
            except OSError as e:
                overlap["complete"] = False  # its area is not counted: no Dice
                _fail(self.result, f"{mask_path}: cannot write ({e.strerror or e})")
                continue
            if truth is None:
                overlap["complete"] = False
            else:
                overlap["intersection"] += int(np.logical_and(truth > 0, pred > 0).sum())
                overlap["true"] += int((truth > 0).sum())
            self.result.written += [mask_path, png]
            counts["slices"] += 1
            counts["tumour_slices"] += int(pred.any())
            counts["area"] += int(pred.sum())
        return {**counts, "overlap": overlap}


def _volumes(images: list[InputFile]) -> dict[tuple[PurePosixPath, str], list[InputFile]]:
    """Images grouped into volumes (one folder, and one case when the names say so), each in
    slice order."""
    groups: dict[tuple[PurePosixPath, str], list[InputFile]] = {}
    for item in images:
        match = slices.SLICE_NAME.match(item.rel.name)
        groups.setdefault((item.rel.parent, match["case"] if match else ""), []).append(item)
    for items in groups.values():
        items.sort(key=lambda it: _slice_number(it.rel))
    return dict(sorted(groups.items()))


def predict_path(
    model: inference.Model | inference.Ensemble,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    threshold: float = 0.5,
    largest_connected_component: bool = False,
) -> PredictResult:
    """Predicts every image under `input_path` into `output` (see the module docstring)."""
    threshold = inference.check_threshold(threshold)
    output = Path(output).expanduser()
    workdirs.make_writable_dir(output, "--output")
    images, masks, problems = collect_inputs(input_path)
    result = PredictResult()
    for message in problems:
        _fail(result, message)
    outputs = _Outputs(output, images, masks, result)
    done = 0
    for (folder, case), items in _volumes(images).items():
        loaded = _load(items, result)
        done += len(items)
        if not loaded:
            continue
        arrays = [a for _, a in loaded]
        preds = _predict_volume(model, arrays, threshold, largest_connected_component)
        counts = outputs.write_volume(loaded, preds)
        patient = case or (
            folder.name if folder.parts else _root_name(Path(input_path).expanduser())
        )
        if counts["slices"]:  # nothing of this volume written: no row to mislead
            copied = kaggle3m.copied_channels(arrays) if same_shape(arrays) else ""
            result.volumes.append(
                {
                    "patient": patient,
                    "folder": folder.as_posix(),
                    "slices": counts["slices"],
                    "slices_with_tumour": counts["tumour_slices"],
                    "tumour_area_pixels": counts["area"],
                    **_volume_dice(counts["overlap"], counts["area"], len(loaded) == len(items)),
                    "copied_channels": copied,
                }
            )
            _log_volume(patient, copied, len(loaded), counts["tumour_slices"], done, len(images))
    _write_csv(output / "volumes.csv", result.volumes)
    return result


def _log_volume(patient: str, copied: str, slices_read: int, tumour: int, done, total) -> None:
    if copied == "all three":
        logging.warning(
            "%s: all three channels hold the same image (modalities missing and copied); "
            "the 4 such scans of the 49 scored 0.51 mean per-volume Dice in the "
            "shipped recipe's cross-validation, against 0.73 for all (RESULTS.md): check its masks",
            patient,
        )
    logging.info(
        "%s: %d slices, %d with tumour (%d/%d images done)",
        *(patient, slices_read, tumour, done, total),
    )


def _write_csv(path: Path, volumes: list[dict]) -> None:
    fields = ["patient", "folder", "slices", "slices_with_tumour", "tumour_area_pixels"]
    fields += ["true_area_pixels", "dice", "copied_channels"]

    def write_csv(p):
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(volumes)

    _write_atomic(path, write_csv)


def same_shape(arrays: list[np.ndarray]) -> bool:
    return len({a.shape for a in arrays}) == 1


def _volume_dice(overlap: dict, pred_area: int, all_read: bool) -> dict:
    """`true_area_pixels` and `dice` of one volume, blank unless every slice had its truth."""
    if not (overlap["complete"] and all_read):
        return {"true_area_pixels": "", "dice": ""}
    total = overlap["true"] + pred_area
    dice = 1.0 if total == 0 else 2.0 * overlap["intersection"] / total
    return {"true_area_pixels": overlap["true"], "dice": round(dice, 6)}


def read_mask_bytes(data: bytes, where: str) -> np.ndarray:
    """A ground-truth mask (H, W) in {0, 1}, through the same guarded reader."""
    return slices.read_mask(data, where, strict=False)
