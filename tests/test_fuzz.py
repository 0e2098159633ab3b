"""The TIFF reading path fed random and mutated bytes never crashes, never hangs, and only
ever raises the project's DataError (hypothesis; bounded: 300 + 300 cases, 5 s deadline each).
A longer run: python bench/fuzz_tiff.py --seconds=600."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lggunet import fuzzing

SEEDS = fuzzing.valid_tiffs()
LIMITS = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@LIMITS
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    fuzzing.read_all_ways(data)


@LIMITS
@given(st.integers(0, len(SEEDS) - 1), st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_mutated_valid_tiffs(which, seed, edits):
    data = fuzzing.mutate(SEEDS[which], np.random.default_rng(seed), edits)
    fuzzing.read_all_ways(data)


def test_seeds_are_valid():
    """The mutations start from files the readers accept."""
    from lggunet import kaggle3m

    source = fuzzing.BytesSource(SEEDS[0])
    assert kaggle3m.read_image(source, source.name).shape == (256, 256, 3)
    source = fuzzing.BytesSource(SEEDS[1])
    assert kaggle3m.read_mask(source, source.name).max() == 1


def test_a_tiff_claiming_a_huge_image_is_refused_before_decoding():
    import tifffile

    from lggunet import kaggle3m

    data = bytearray(SEEDS[0])
    with tifffile.TiffFile(__import__("io").BytesIO(bytes(data))) as tif:
        tags = tif.pages[0].tags
        offsets = [
            (tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")
        ]
    for offset, dtype in offsets:  # 60000 x 60000 x 3: 10 GB if decoded
        size = 2 if int(dtype) == 3 else 4  # SHORT or LONG
        data[offset : offset + size] = (60000).to_bytes(size, "little")
    source = fuzzing.BytesSource(bytes(data))
    try:
        kaggle3m.read_image(source, source.name)
    except kaggle3m.DataError as e:
        assert "claims a (60000, 60000, 3) uint8 image, far larger than a slice" in str(e)
    else:
        raise AssertionError("accepted a 60000x60000 image")
    from lggunet import predict_files

    try:  # the prediction reader shares the guard
        predict_files.read_slice(bytes(data), "huge.tif")
    except kaggle3m.DataError as e:
        assert "far larger than a slice" in str(e)
    else:
        raise AssertionError("predict accepted a 60000x60000 image")
