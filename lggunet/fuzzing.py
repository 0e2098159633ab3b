"""Mutated TIFF bytes for fuzzing the reading path (tests/test_fuzz.py, bench/fuzz_tiff.py)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import tifffile

from lggunet import kaggle3m


class BytesSource(kaggle3m.Source):
    """A source holding one in-memory file."""

    location = "fuzz"

    def __init__(self, data: bytes, name: str = "TCGA_FZ_0001_20000101_1.tif"):
        self.data, self.name = data, name

    def members(self) -> dict[str, int]:
        return {self.name: len(self.data)}

    def read(self, member: str) -> bytes:
        return self.data


def valid_tiffs() -> list[bytes]:
    """Seeds: a slice image, a mask, and a tiled / compressed variant."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = (rng.random((256, 256)) > 0.9).astype(np.uint8) * 255
    seeds = []
    for array, kwargs in (
        (image, {"photometric": "rgb"}),
        (mask, {}),
        (image, {"photometric": "rgb", "tile": (64, 64), "compression": "zlib"}),
    ):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, **kwargs)
        seeds.append(buffer.getvalue())
    return seeds


def mutate(data: bytes, rng: np.random.Generator, edits: int) -> bytes:
    """Random byte flips, overwrites of header-sized runs, truncation or insertion."""
    out = bytearray(data)
    for _ in range(edits):
        kind = rng.integers(0, 4)
        if not out:
            break
        pos = int(rng.integers(0, len(out)))
        if kind == 0:
            out[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            pos = int(rng.integers(0, min(len(out), 512)))  # where the IFD usually is
            out[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif kind == 2:
            del out[pos:]
        else:
            out[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    return bytes(out)


def read_all_ways(data: bytes) -> None:
    """Every reader of untrusted TIFF bytes; each must return or raise DataError."""
    from lggunet import predict_files

    source = BytesSource(data)
    for read in (kaggle3m.read_image, kaggle3m.read_mask):
        with contextlib.suppress(kaggle3m.DataError):
            read(source, source.name)
    with contextlib.suppress(kaggle3m.DataError):
        predict_files.read_slice(data, "fuzz.tif")
