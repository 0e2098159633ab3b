"""The one reader of slice files, with its limits: TIFF bytes to an image or a mask, the
Kaggle file-name pattern, and the guard on paths inside zips. The dataset builder (through
`lggunet.kaggle3m`) and `--mode=predict` (`lggunet.predict_files`) both read with it;
`lggunet.walk` lists and opens folder files with the same size limit.
"""

from __future__ import annotations

import io
import re
from pathlib import PurePosixPath

import numpy as np
import tifffile

from lggunet import walk
from lggunet.errors import DataError

MAX_FILE_BYTES = walk.MAX_FILE_BYTES  # a slice TIFF is ~200 KB; larger files are not read
MAX_PIXELS_BYTES = 64 * 2**20  # a slice is 192 KiB of pixels; refuse to decode what claims more

# TCGA_<inst>_<id>_<date>_<n>.tif and ..._<n>_mask.tif (extensions in any case, .tif or .tiff)
SLICE_NAME = re.compile(
    r"^(?P<case>(?P<patient>TCGA_(?P<institution>[A-Za-z0-9]{2})_[A-Za-z0-9]+)_[0-9]+)"
    r"_(?P<index>[0-9]+)(?P<mask>_(?i:mask))?\.(?i:tiff?)$"
)


def missing_numbers(numbers) -> list[int]:
    """The slice numbers between the lowest and highest of `numbers` that are not among them."""
    present = set(numbers)
    return sorted(set(range(min(present), max(present) + 1)) - present) if present else []


def listed(numbers: list[int]) -> str:
    """Slice numbers for a message: the first five, then "..."."""
    return ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")


def safe_member(name: str) -> PurePosixPath | None:
    """A zip member's path as a relative path that stays inside the folder it is read or
    written under; None for an absolute path, a '..' or a ':' (a drive; zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or path.is_absolute() or not path.parts:
        return None
    if ".." in path.parts or ":" in name:  # a drive, or an NTFS stream
        return None
    return path


def decode_tiff(data: bytes, where: str) -> np.ndarray:
    """The one page of a TIFF file's bytes; DataError naming `where` if it is not exactly one
    readable page of plausible size (a hostile header cannot make it allocate gigabytes)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) == 0:
                raise DataError(f"{where}: unreadable TIFF (no image in it)")
            if len(tif.pages) != 1:
                raise DataError(f"{where}: a stack of {len(tif.pages)} pages, expected one slice")
            page = tif.pages[0]
            if int(np.prod(page.shape, dtype=np.int64)) * page.dtype.itemsize > MAX_PIXELS_BYTES:
                raise DataError(
                    f"{where}: claims a {page.shape} {page.dtype} image, far larger than a slice"
                )
            return page.asarray()
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types on broken files
        raise DataError(f"{where}: unreadable TIFF ({type(e).__name__}: {e})") from e


def read_image(data: bytes, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A (H, W, 3) uint8 slice (pre-contrast, FLAIR, post-contrast) from TIFF bytes, of
    exactly `shape` when given; a DataError naming `where` otherwise."""
    image = decode_tiff(data, where)
    if shape is not None and (image.shape != shape or image.dtype != np.uint8):
        raise DataError(f"{where}: image is {image.dtype} {image.shape}, expected uint8 {shape}")
    channels = 1 if image.ndim == 2 else image.shape[-1]
    if image.ndim not in (2, 3) or channels != 3:
        raise DataError(
            f"{where}: {channels} channel(s) {image.shape}; the model needs 3 "
            "(pre-contrast, FLAIR, post-contrast)"
        )
    if image.dtype != np.uint8:
        raise DataError(f"{where}: pixel type {image.dtype}; expected uint8 (0..255)")
    return image


def read_mask(
    data: bytes, where: str, shape: tuple[int, ...] | None = None, strict: bool = True
) -> np.ndarray:
    """A (H, W) uint8 mask in {0, 1} from TIFF bytes. `strict` (training data): uint8 of
    exactly `shape` holding {0, 255} or {0, 1}, else a DataError naming `where`; otherwise
    (ground truth beside images to predict) any pixel type and size holding 0 and one other
    value (tumour), in one channel or several alike (an alpha channel aside); other values
    (a grey level, a label map) are a DataError too, not a guess."""
    mask = decode_tiff(data, where)
    if not strict and mask.ndim == 3 and mask.shape[-1] in (2, 4):  # grey or RGB, with alpha
        mask = mask[..., : mask.shape[-1] - 1]
    if not strict and mask.ndim == 3 and np.any(mask != mask[..., :1]):
        raise DataError(f"{where}: mask {mask.shape} has channels that differ; expected one")
    if mask.ndim == 3 and (mask.shape[-1] == 1 or not strict):
        mask = mask[..., 0]
    if not strict and np.count_nonzero(values := np.unique(mask)) > 1:
        raise DataError(
            f"{where}: mask values {values[:8].tolist()} are not 0 and one tumour value"
        )
    if strict and ((shape is not None and mask.shape != shape) or mask.dtype != np.uint8):
        raise DataError(f"{where}: mask is {mask.dtype} {mask.shape}, expected uint8 {shape}")
    if strict:
        values = np.unique(mask)
        if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
            raise DataError(
                f"{where}: mask values {values[:8].tolist()} are not in {{0, 255}} (or {{0, 1}})"
            )
    return (mask != 0).astype(np.uint8)
