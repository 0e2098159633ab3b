"""Images on disk as patient volumes: what `--mode=predict` reads, and `read_patient` for
notebooks. The input is one .tif slice, a patient folder, a kaggle_3m-style folder of patient
folders, or a zip of any of these; files named `*_mask.tif` are the ground truth of the image
beside them. A volume is one folder's slices of one case (the Kaggle names say which), in
slice-number order.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from absl import logging

from lggunet import slices, walk
from lggunet.errors import DataError

_TIF = re.compile(r"\.tiff?$", re.IGNORECASE)
_MASK = re.compile(r"_mask\.tiff?$", re.IGNORECASE)
_SLICE_NUMBER = re.compile(r"(\d+)\D*\.tiff?$", re.IGNORECASE)  # the name's last number
_OUR_MASK = re.compile(r"_pred_mask\.tif$")
# Slices in another image format (left aside, and said so), and the pictures predict writes.
_OTHER_IMAGE = re.compile(r"\.(png|jpe?g|bmp|gif|dcm|nii|nii\.gz)$", re.IGNORECASE)
_OUR_PICTURE = re.compile(r"(_overlay\.png|_montage\.png|_pred_mask\.nii\.gz)$")


@dataclasses.dataclass(frozen=True)
class InputFile:
    rel: PurePosixPath  # relative path of the image, used for the outputs
    read: object  # () -> bytes
    where: str  # for messages
    mask_key: tuple[str, str] | None = None  # its ground truth's key in the masks, if any


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


def _other_image(name: str) -> bool:
    """An image in another format than TIFF that predict did not write (not macOS litter)."""
    parts = PurePosixPath(name).parts
    return (
        bool(_OTHER_IMAGE.search(name))
        and not _OUR_PICTURE.search(name)
        and "__MACOSX" not in parts
        and not PurePosixPath(name).name.startswith("._")
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
    others: list[str] = []  # images in other formats, left aside
    if path.is_file() and zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)
        for info in archive.infolist():
            if not info.is_dir() and _other_image(info.filename):
                others.append(walk.shown(f"{path}!{info.filename}"))
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
        if path.suffix.lower() == ".zip":
            raise DataError(
                f"{walk.shown(path)}: a .zip that cannot be opened (damaged or cut short?)"
            )
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
        for folder, _, names in os.walk(path):  # never opened: only named
            rel = Path(folder).relative_to(path)
            others += [walk.shown(Path(folder) / n) for n in names if _other_image(f"{rel}/{n}")]
    if others:
        logging.warning(
            "%d image file(s) not in TIFF format left aside (predict reads .tif slices): %s",
            len(others),
            ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else ""),
        )
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


def root_name(path: Path) -> str:
    """The patient of images lying directly in the input: the folder's (or file's folder's)
    name, or the zip's stem."""
    if path.is_dir():
        return path.resolve().name
    if zipfile.is_zipfile(path):
        return path.stem
    return path.resolve().parent.name


def slice_number(rel: PurePosixPath) -> tuple[int, str]:
    """(the slice's number: the last number in its name, -1 for none; the name), the sort key
    of a volume's slices: `x_2.tif` before `x_10.tif`, `slice9.tif` before `slice10.tif`."""
    m = _SLICE_NUMBER.search(rel.name)
    return (int(m.group(1)) if m else -1, rel.name)


def orphan_masks(images: list[InputFile], masks: dict) -> list[str]:
    """The ground-truth masks whose image is not there (a slice lost), where each lies."""
    return sorted(masks[key][1] for key in orphan_keys(images, masks))


def orphan_keys(images: list[InputFile], masks: dict) -> list[tuple[str, str]]:
    """The keys of those masks: (folder, name less `_mask.tif`), both lower case."""
    used = {it.mask_key for it in images}
    return [key for key in masks if key not in used]


def absent_numbers(items: list[InputFile], orphans: list[tuple[str, str]]) -> list[int]:
    """The slice numbers a volume lacks: gaps in its images' numbering, and the numbers of
    its ground-truth masks whose image is not there (`orphans`: such masks' keys) even
    beyond its first or last image."""
    folder = items[0].rel.parent.as_posix().lower()
    series = series_name(PurePosixPath(items[0].rel.name.lower()))
    present = {slice_number(it.rel)[0] for it in items}
    lost = {
        slice_number(rel)[0]
        for key_folder, stem in orphans
        if key_folder == folder and series_name(rel := PurePosixPath(f"{stem}.tif")) == series
    }
    return sorted(set(slices.missing_numbers((present | lost) - {-1})) | (lost - present - {-1}))


def order_problem(items: list[InputFile]) -> str:
    """Why the volume's slice order is not known ("" when it is): a name without a number,
    a number used twice, or numbers with a gap (a slice missing)."""
    numbers = [slice_number(it.rel)[0] for it in items]
    if len(items) == 1:
        return ""
    if -1 in numbers:
        return f"{items[numbers.index(-1)].rel.name} has no slice number in its name"
    seen: dict[int, str] = {}
    for it, n in zip(items, numbers, strict=True):
        if n in seen:
            return f"slice number {n} is used twice ({seen[n]}, {it.rel.name})"
        seen[n] = it.rel.name
    if missing := slices.missing_numbers(numbers):
        shown = slices.listed(missing)
        return f"slice(s) {shown} missing between {min(numbers)} and {max(numbers)}"
    return ""


_NUMBER_AT_END = re.compile(r"[\s_.-]*\d+\D*$")


def series_name(rel: PurePosixPath) -> str:
    """The volume a slice belongs to, from its name: the Kaggle case
    (`TCGA_CS_4941_19960909` of `..._12.tif`), else the name less its last number (`scan` of
    `scan_12.tif`, "" for `12.tif`)."""
    match = slices.SLICE_NAME.match(rel.name)
    if match:
        return match["case"]
    return _NUMBER_AT_END.sub("", _TIF.sub("", rel.name))


def volumes(images: list[InputFile]) -> dict[tuple[PurePosixPath, str], list[InputFile]]:
    """Images grouped into volumes (one folder and one series name, `series_name`), each in
    slice order."""
    groups: dict[tuple[PurePosixPath, str], list[InputFile]] = {}
    for item in images:
        groups.setdefault((item.rel.parent, series_name(item.rel)), []).append(item)
    for items in groups.values():
        items.sort(key=lambda it: slice_number(it.rel))
    return dict(sorted(groups.items()))


def volume_name(groups: dict, folder: PurePosixPath, series: str, root: Path) -> str:
    """A volume's name for people: its Kaggle case, else its folder's (or the input's) name
    when it is the folder's only volume, else its series name."""
    if slices.SLICE_NAME.match(f"{series}_1.tif"):
        return series
    alone = sum(1 for f, _ in groups if f == folder) == 1
    if alone or not series:
        return folder.name if folder.parts else root_name(root)
    return series


@dataclasses.dataclass
class Patient:
    """One patient's slices, in slice-number order.

    images: (N, H, W, 3) uint8, channels pre-contrast, FLAIR, post-contrast (0..255).
    masks: (N, H, W) uint8 in {0, 1} when every slice has its `_mask.tif`, else None.
    slice_numbers: the `_<n>` of each file name; files: where each slice was read from.
    """

    name: str
    images: np.ndarray
    masks: np.ndarray | None
    slice_numbers: list[int]
    files: list[str]

    def __repr__(self) -> str:
        n, h, w, _ = self.images.shape
        truth = "with masks" if self.masks is not None else "no masks"
        return f"Patient({self.name!r}: {n} slices of {h}x{w}, {truth})"


def read_patient(path: str | os.PathLike) -> Patient:
    """One patient's folder (or a zip of it) as arrays, slices in numeric order; a DataError
    naming the file when a slice cannot be read, when slices differ in size, when only some
    slices have masks, or when the folder holds more than one patient."""
    images, masks, problems = collect_inputs(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    groups = volumes(images)
    if len(groups) != 1:
        names = ", ".join(
            case or (folder.as_posix() if folder.parts else "files without a case name")
            for folder, case in list(groups)[:4]
        ) + (", ..." if len(groups) > 4 else "")
        raise DataError(
            f"{walk.shown(path)}: holds {len(groups)} volumes ({names}): give one patient's folder"
        )
    (folder, case), items = next(iter(groups.items()))
    problem = order_problem(items)
    orphans = orphan_masks(images, masks)
    if problem or orphans:
        raise DataError(f"{walk.shown(path)}: " + (problem or f"{orphans[0]} has no image"))
    arrays = [slices.read_image(it.read(), it.where) for it in items]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise DataError(
            f"{walk.shown(path)}: slices of different sizes in one patient "
            f"({', '.join(f'{h}x{w}' for h, w, _ in sorted(sizes))})"
        )
    with_mask = [it for it in items if it.mask_key is not None]
    truth = None
    if with_mask and len(with_mask) != len(items):
        lacking = next(it.where for it in items if it.mask_key is None)
        raise DataError(
            f"{lacking}: has no _mask.tif beside it while {len(with_mask)} of the "
            f"{len(items)} slices have one"
        )
    if with_mask:
        truth = np.stack(
            [
                slices.read_mask(
                    masks[it.mask_key][0](), masks[it.mask_key][1], arrays[0].shape[:2]
                )
                for it in items
            ]
        )
    name = volume_name(groups, folder, case, Path(path).expanduser())
    return Patient(
        name=name,
        images=np.stack(arrays),
        masks=truth,
        slice_numbers=[slice_number(it.rel)[0] for it in items],
        files=[it.where for it in items],
    )


def warn_repeated_cases(groups: dict) -> None:
    """A Kaggle case in several folders (the Kaggle zip holds `kaggle_3m/` twice): each copy
    is predicted and has its row (and counts in the summary); said once, as copies."""
    folders = collections.defaultdict(list)
    for folder, series in groups:
        if slices.SLICE_NAME.match(f"{series}_1.tif"):
            folders[series].append(folder.as_posix() or ".")
    repeated = {case: where for case, where in folders.items() if len(where) > 1}
    if repeated:
        case, where = next(iter(repeated.items()))
        logging.warning(
            "%d patient(s) found in more than one folder, each copy predicted (e.g. %s in %s)",
            *(len(repeated), case, ", ".join(where)),
        )
