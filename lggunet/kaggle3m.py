"""Find, list, validate and read the Kaggle `kaggle_3m/` folder, extracted or zipped.

Layout (Kaggle `mateuszbuda/lgg-mri-segmentation`)::

    kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif        256x256x3 uint8
    kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12_mask.tif   256x256 uint8 {0,255}
    kaggle_3m/data.csv

The three image channels are pre-contrast, FLAIR and post-contrast. A zip is read in place,
never extracted, so member paths cannot write anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from lggunet import slices, walk
from lggunet.errors import DataError

IMAGE_SHAPE = (256, 256, 3)
MASK_SHAPE = (256, 256)
FOLDER_NAME = "kaggle_3m"

_SLICE_RE = slices.SLICE_NAME
MAX_SLICE_NUMBER = 100_000  # a scan has tens of slices; the prepared data stores int32

HOW_TO_GET_DATA = (  # one line: it ends error messages
    "get the data (https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation) as its "
    "zip or the extracted folder holding kaggle_3m/ and pass --config.data.manual_dir=PATH, "
    "or pass --config.data.download=True (needs Kaggle credentials for kagglehub)"
)
# For tfds's manual-download message, which may span lines.
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Get the LGG MRI Segmentation data set (Kaggle `mateuszbuda/lgg-mri-segmentation`) in one of
these ways:
  * by hand: download the zip from
      https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation
    and pass the zip, or the folder you extracted it to (the one holding `kaggle_3m/`), with
      --config.data.manual_dir=PATH
  * automatically: pass --config.data.download=True (needs Kaggle credentials for kagglehub,
    see https://github.com/Kaggle/kagglehub#authenticate)."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """One slice of one patient: where its image and mask live inside the source."""

    patient_id: str  # e.g. "TCGA_CS_4941" (the key of data.csv)
    case: str  # e.g. "TCGA_CS_4941_19960909" (the patient folder)
    institution: str  # e.g. "CS"
    index: int  # the slice number in the file name (1-based, as in the data set)
    image: str  # member path of the image inside the source
    mask: str  # member path of the mask inside the source


class Source:
    """A `kaggle_3m/` tree: member paths relative to it, their sizes, and their bytes."""

    location: str

    def members(self) -> dict[str, int]:
        """Relative POSIX path -> size in bytes, for every file under `kaggle_3m/`."""
        raise NotImplementedError

    def read(self, member: str) -> bytes:
        raise NotImplementedError

    def describe(self, member: str) -> str:
        """A human-readable name for a member, for error messages."""
        return f"{self.location}/{member}"

    def patient_folders(self) -> list[str]:
        """Names of the folders directly under `kaggle_3m/` (files or not)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of the location, file list, sizes and stamps: changes when the data does."""
        raise NotImplementedError


class FolderSource(Source):
    """An extracted `kaggle_3m/` folder, listed by `lggunet.walk` (links followed inside it,
    special and oversized files named, never opened)."""

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)
        self._members: dict[str, int] | None = None
        self.problems: list[str] = []

    def members(self) -> dict[str, int]:
        if self._members is None:
            found, self.problems = walk.list_files(self.root, _is_data_file)
            self._members = {f.rel.as_posix(): f.path.stat().st_size for f in found}
        return self._members

    def patient_folders(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def read(self, member: str) -> bytes:
        return walk.read_file(self.root / member)

    def describe(self, member: str) -> str:
        return walk.shown(super().describe(member))

    def fingerprint(self) -> str:
        """A digest of the location and every data file's name and content (BLAKE2b; 3.7 s
        for the 49 shared patients, 452 MB, on a busy 2-core machine), so an edited slice is
        never served stale, even with its size and time stamp kept."""
        h = hashlib.blake2b(digest_size=32)
        h.update(repr(str(self.root.resolve())).encode())
        for member in sorted(self.members()):
            data = self.read(member)
            h.update(repr((member, len(data))).encode())
            h.update(data)
        return h.hexdigest()


def _is_data_file(rel: PurePosixPath) -> bool:
    return rel.name.lower().endswith((".tif", ".tiff")) or rel.name == "data.csv"


class ZipSource(Source):
    """`kaggle_3m/` inside a zip (possibly nested one folder deep), read without extracting."""

    def __init__(self, zip_path: Path, prefix: str):
        self.zip_path = zip_path
        self.prefix = prefix  # e.g. "kaggle_3m/" or "lgg-mri-segmentation/kaggle_3m/"
        self.location = f"{zip_path}!{prefix.rstrip('/')}"
        try:
            self._zip = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{zip_path}: not a readable zip ({e})") from e
        for info in self._zip.infolist():
            if slices.safe_member(info.filename) is None:
                raise DataError(
                    f"{zip_path}!{info.filename}: member path escapes the archive (absolute or "
                    "'..'); refusing this zip (it is read in place; nothing was written)"
                )
        self._infos = {
            info.filename[len(prefix) :]: info
            for info in self._zip.infolist()
            if info.filename.startswith(prefix) and not info.is_dir()
        }

    def members(self) -> dict[str, int]:
        return {name: info.file_size for name, info in self._infos.items()}

    def patient_folders(self) -> list[str]:
        folders = set()
        for info in self._zip.infolist():
            if info.filename.startswith(self.prefix):
                rest = PurePosixPath(info.filename[len(self.prefix) :]).parts
                if len(rest) > 1 or (len(rest) == 1 and info.is_dir()):
                    folders.add(rest[0])
        return sorted(folders)

    def read(self, member: str) -> bytes:
        info = self._infos.get(member)
        if info is not None and info.file_size > slices.MAX_FILE_BYTES:
            raise DataError(
                f"{self.describe(member)}: {info.file_size} bytes unpacked, not a slice"
            )
        try:
            return self._zip.read(self._infos[member])
        except Exception as e:  # BadZipFile, zlib.error, encrypted members, ...
            raise DataError(f"{self.describe(member)}: cannot read zip member: {e!r}") from e

    def fingerprint(self) -> str:
        infos = self._infos
        rows = [(m, infos[m].file_size, infos[m].CRC) for m in sorted(infos)]
        return _digest([str(self.zip_path.resolve()), self.prefix, *rows])

    def __getstate__(self):  # zip handles do not pickle; reopen in the other process
        return {"zip_path": self.zip_path, "prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["zip_path"], state["prefix"])


def _digest(rows: Iterable) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(repr(row).encode())
    return h.hexdigest()


def _zip_prefix(zip_path: Path) -> str | None:
    """The shallowest `kaggle_3m/` folder in a zip (at the top or one level down), if any."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{zip_path}: not a readable zip file: {e}") from e
    prefixes = set()
    for name in names:
        parts = PurePosixPath(name).parts
        for depth in (0, 1):
            if len(parts) > depth + 1 and parts[depth] == FOLDER_NAME:
                prefixes.add("/".join(parts[: depth + 1]) + "/")
    if not prefixes:
        return None
    return min(prefixes, key=lambda p: (p.count("/"), p))


def _looks_like_kaggle_3m(folder: Path) -> bool:
    return folder.name == FOLDER_NAME or any(
        p.is_dir() and p.name.startswith("TCGA_") for p in folder.iterdir()
    )


def open_source(manual_dir: str | os.PathLike) -> Source:
    """Finds `kaggle_3m/` at, in, or one folder below `manual_dir`, or in a zip there."""
    path = Path(manual_dir).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {HOW_TO_GET_DATA}")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            if path.suffix.lower() == ".zip":
                raise DataError(f"{path}: a .zip that cannot be opened (damaged or cut short?)")
            raise DataError(f"{path}: not a folder and not a zip file; {HOW_TO_GET_DATA}")
        prefix = _zip_prefix(path)
        if prefix is None:
            raise DataError(f"{path}: the zip holds no `{FOLDER_NAME}/` folder; {HOW_TO_GET_DATA}")
        return ZipSource(path, prefix)
    if _looks_like_kaggle_3m(path):
        return FolderSource(path)
    for candidate in [path / FOLDER_NAME, *sorted(path.glob(f"*/{FOLDER_NAME}"))]:
        if candidate.is_dir():
            return FolderSource(candidate)
    for zip_path in sorted(path.glob("*.zip")):
        prefix = _zip_prefix(zip_path)
        if prefix is not None:
            return ZipSource(zip_path, prefix)
    raise DataError(
        f"{path}: found no `{FOLDER_NAME}/` folder, patient folders (TCGA_*) or zip holding "
        f"them; {HOW_TO_GET_DATA}"
    )


def list_slices(source: Source, problems: list[str] | None = None) -> list[Slice]:
    """Pairs every image with its mask; raises DataError naming any file that breaks the
    layout, or, when a `problems` list is given, appends the message there and skips the file
    (both files of a duplicated slice number)."""

    def problem(message: str) -> None:
        if problems is None:
            raise DataError(message)
        problems.append(message)

    images: dict[tuple[str, int], tuple[str, re.Match]] = {}
    masks: dict[tuple[str, int], str] = {}
    duplicated: set[tuple[str, int]] = set()
    tif_folders: set[str] = set()
    members = source.members()  # lists the source, finding the files it will not read
    for message in getattr(source, "problems", []):
        problem(message)
    for member in sorted(members):
        path = PurePosixPath(member)
        if not path.name.lower().endswith((".tif", ".tiff")):
            continue  # data.csv, README files and the like
        tif_folders.add(path.parts[0] if len(path.parts) > 1 else "")
        match = _SLICE_RE.match(path.name)
        if match is None:
            problem(
                f"{source.describe(member)}: file name does not follow "
                "TCGA_<inst>_<id>_<date>_<n>.tif or ..._<n>_mask.tif (no slice number?)"
            )
            continue
        key = (match["case"], int(match["index"]))
        if key[1] > MAX_SLICE_NUMBER:
            problem(
                f"{source.describe(member)}: slice number {match['index']} is not plausible "
                f"(at most {MAX_SLICE_NUMBER})"
            )
            continue
        table = masks if match["mask"] else images
        if key in table:
            other = table[key] if match["mask"] else table[key][0]
            problem(
                f"{source.describe(member)}: duplicate slice number {key[1]} of {key[0]} "
                f"(also {source.describe(other)})"
            )
            duplicated.add(key)
            continue
        table[key] = member if match["mask"] else (member, match)
    for folder in source.patient_folders():
        if folder not in tif_folders:
            problem(f"{source.describe(folder)}: patient folder with no slices (*.tif) in it")
    for key, member in masks.items():
        if key not in images and key not in duplicated:
            problem(f"{source.describe(member)}: mask without an image")
    for folder, message in _numbering_gaps(images, masks, duplicated).values():
        problem(f"{source.describe(folder)}: {message}; " + GAP_RULE[problems is None])
    slices = []
    for key, (member, match) in sorted(images.items()):
        if key in duplicated:
            continue
        if key not in masks:
            problem(f"{source.describe(member)}: image without a mask")
            continue
        slices.append(
            Slice(
                patient_id=match["patient"],
                case=match["case"],
                institution=match["institution"],
                index=key[1],
                image=member,
                mask=masks[key],
            )
        )
    if not slices:
        raise DataError(f"{source.location}: no slices (*.tif with *_mask.tif) found")
    return slices


GAP_RULE = {  # strict preparation: an error; data.skip_invalid: a hole, as a skipped slice leaves
    True: "a scan's slices must be numbered without gaps (per-volume scores and 3D "
    "post-processing join neighbouring slices)",
    False: "its other slices are kept, as one volume with a hole",
}


def _numbering_gaps(images: dict, masks: dict, duplicated: set) -> dict[str, tuple[str, str]]:
    """case -> (its folder, "slice(s) ... missing between a and b") for each scan whose slice
    numbers, over its images and masks (a slice left out for another problem included), skip
    a number: a slice missing from the source itself."""
    numbers: dict[str, set[int]] = {}
    folders: dict[str, str] = {}
    for (case, index), value in [*images.items(), *masks.items()]:
        numbers.setdefault(case, set()).add(index)
        member = value[0] if isinstance(value, tuple) else value
        parent = PurePosixPath(member).parent
        folders.setdefault(case, str(parent) if parent.parts else member)
    for case, index in duplicated:
        numbers.setdefault(case, set()).add(index)
    gaps = {}
    for case, present in numbers.items():
        if missing := slices.missing_numbers(present):
            gaps[case] = (
                folders[case],
                f"slice(s) {slices.listed(missing)} of {case} missing between {min(present)} "
                f"and {max(present)}",
            )
    return gaps


def read_image(source: Source, member: str) -> np.ndarray:
    """The (256, 256, 3) uint8 image (pre-contrast, FLAIR, post-contrast)."""
    return slices.read_image(source.read(member), source.describe(member), IMAGE_SHAPE)


def read_mask(source: Source, member: str) -> np.ndarray:
    """The (256, 256) uint8 mask in {0, 1}; files may hold {0, 255} or {0, 1}."""
    return slices.read_mask(source.read(member), source.describe(member), MASK_SHAPE)


def volume_statistics(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32, shape (3,)) over all pixels of one patient's slices
    (the `zscore_volume` normalisation's statistics)."""
    volume = np.concatenate([np.asarray(x).reshape(-1, 3) for x in images]).astype(np.float64)
    return volume.mean(axis=0).astype(np.float32), volume.std(axis=0).astype(np.float32)


CHANNEL_NAMES = ("pre-contrast", "FLAIR", "post-contrast")


def copied_channels(images: Sequence[np.ndarray]) -> str:
    """Which channels of one patient's slices hold the very same image, as where a missing
    modality was filled with a copy of another: "" when all three differ, e.g.
    "FLAIR=post-contrast" for two, "all three" for one image in every channel (4 of the 49
    shared patients; predict warns about those, RESULTS.md has their scores)."""
    volume = np.stack([np.asarray(x) for x in images]).reshape(-1, 3)
    return channel_copies_label(
        [(i, j) for i, j in CHANNEL_PAIRS if np.array_equal(volume[:, i], volume[:, j])]
    )


CHANNEL_PAIRS = ((0, 1), (1, 2), (0, 2))


def channel_copies_label(same_pairs) -> str:
    """copied_channels' label for the channel pairs (i, j) found identical."""
    same = sorted(same_pairs)
    if len(same) >= 2:
        return "all three"
    return "=".join(CHANNEL_NAMES[k] for k in same[0]) if same else ""
