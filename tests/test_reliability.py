"""Bad input: every case gives a DataError naming the file and the problem, leaves no prepared
data set behind that a later run would take as complete, and (for per-slice problems) is
skipped and reported with data.skip_invalid=True. The table is docs/reliability.md."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import tifffile

from lggunet import dataset, kaggle3m
from lggunet.configs import unet
from lggunet.errors import DataError

CASE = "TCGA_BB_0003_20000103"


def data_config(manual_dir, data_dir, **overrides):
    config = unet.get_config().data
    config.manual_dir = str(manual_dir)
    config.data_dir = str(data_dir)
    config.split_fractions = (0.6, 0.2, 0.2)
    for k, v in overrides.items():
        config[k] = v
    return config


def image_path(root, n=2):
    return root / CASE / f"{CASE}_{n}.tif"


def mask_path(root, n=2):
    return root / CASE / f"{CASE}_{n}_mask.tif"


def _rgb(shape):
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


# name -> (how to break a fresh synthetic kaggle_3m, regex the error must match, the bad file)
PER_SLICE_CASES = {
    "image without mask": (
        lambda r: mask_path(r).unlink(),
        rf"{CASE}_2\.tif: image without a mask",
    ),
    "mask without image": (
        lambda r: image_path(r).unlink(),
        rf"{CASE}_2_mask\.tif: mask without an image",
    ),
    "unreadable TIFF (random bytes)": (
        lambda r: image_path(r).write_bytes(os.urandom(5000)),
        rf"{CASE}_2\.tif: unreadable TIFF",
    ),
    "truncated TIFF": (
        lambda r: image_path(r).write_bytes(image_path(r).read_bytes()[:1500]),
        rf"{CASE}_2\.tif: unreadable TIFF",
    ),
    "empty file": (
        lambda r: image_path(r).write_bytes(b""),
        rf"{CASE}_2\.tif: unreadable TIFF",
    ),
    "image 512x512": (
        lambda r: tifffile.imwrite(image_path(r), _rgb((512, 512, 3)), photometric="rgb"),
        rf"{CASE}_2\.tif: image is uint8 \(512, 512, 3\), expected uint8 \(256, 256, 3\)",
    ),
    "image with 1 channel": (
        lambda r: tifffile.imwrite(image_path(r), _rgb((256, 256))),
        rf"{CASE}_2\.tif: image is uint8 \(256, 256\), expected",
    ),
    "image with 4 channels": (
        lambda r: tifffile.imwrite(image_path(r), _rgb((256, 256, 4)), photometric="rgb"),
        rf"{CASE}_2\.tif: image is uint8 \(256, 256, 4\), expected",
    ),
    "image 16-bit": (
        lambda r: tifffile.imwrite(image_path(r), _rgb((256, 256, 3)).astype(np.uint16) * 200),
        rf"{CASE}_2\.tif: image is uint16",
    ),
    "multi-page stack": (
        lambda r: tifffile.imwrite(
            image_path(r), _rgb((2, 256, 256, 3)), photometric="rgb", metadata=None
        ),
        rf"{CASE}_2\.tif: a stack of 2 pages",
    ),
    "mask values outside {0,255}": (
        lambda r: tifffile.imwrite(mask_path(r), np.full((256, 256), 128, np.uint8)),
        rf"{CASE}_2_mask\.tif: mask values \[128\] are not in",
    ),
    "mask wrong shape": (
        lambda r: tifffile.imwrite(mask_path(r), np.zeros((128, 128), np.uint8)),
        rf"{CASE}_2_mask\.tif: mask is uint8 \(128, 128\)",
    ),
    "slice name without a number": (
        lambda r: image_path(r).rename(r / CASE / f"{CASE}_two.tif"),
        rf"{CASE}_two\.tif: file name does not follow",
    ),
    "duplicate slice numbers": (
        lambda r: (r / CASE / f"{CASE}_02.tif").write_bytes(image_path(r).read_bytes()),
        rf"{CASE}_2\.tif: duplicate slice number 2 of {CASE}",
    ),
    "patient folder with no slices": (
        lambda r: (r / "TCGA_DD_0009_20000109").mkdir(),
        r"TCGA_DD_0009_20000109: patient folder with no slices",
    ),
    "a slice missing from the numbering": (
        lambda r: (image_path(r).unlink(), mask_path(r).unlink()),
        rf"{CASE}: slice\(s\) 2 of {CASE} missing between 1 and 3; (a scan's slices must "
        "be|its other slices are kept)",
    ),
}


@pytest.mark.parametrize("name", sorted(PER_SLICE_CASES))
def test_bad_slice_is_named_and_nothing_half_prepared_is_left(name, synthetic_kaggle_3m, tmp_path):
    break_it, pattern = PER_SLICE_CASES[name]
    break_it(synthetic_kaggle_3m)
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match=pattern):
        dataset.prepare(data_config(synthetic_kaggle_3m, data_dir))
    assert not list(data_dir.rglob("dataset_info.json"))  # nothing taken as complete later


@pytest.mark.parametrize("name", sorted(PER_SLICE_CASES))
def test_skip_invalid_leaves_the_bad_slice_out_and_reports_it(
    name, synthetic_kaggle_3m, tmp_path, caplog
):
    break_it, pattern = PER_SLICE_CASES[name]
    break_it(synthetic_kaggle_3m)
    builder = dataset.prepare(
        data_config(synthetic_kaggle_3m, tmp_path / "tfds", skip_invalid=True)
    )
    skipped = builder.info.metadata["skipped"]
    assert any(__import__("re").search(pattern, s) for s in skipped), skipped
    total = sum(s.num_examples for s in builder.info.splits.values())
    # 15 slices; the broken one (both files of a duplicate) is out, nothing else (a scan with
    # a gap in its numbering keeps its other slices, as one with a skipped slice does).
    expected = {"duplicate slice numbers": 14, "patient folder with no slices": 15}.get(name, 14)
    assert total == expected
    assert f"{len(skipped)} problem(s); the slices they name were left out" in caplog.text


@pytest.mark.parametrize("compression", ["lzw", "zlib", "packbits", "zstd"])
def test_compressed_tiffs_read_as_the_same_pixels(compression, synthetic_kaggle_3m):
    """Slices saved with a codec (LZW from ImageJ or PIL, and others; read through
    imagecodecs) give the very pixels of the uncompressed file."""
    source = kaggle3m.open_source(synthetic_kaggle_3m)
    image = kaggle3m.read_image(source, f"{CASE}/{CASE}_2.tif")
    mask = kaggle3m.read_mask(source, f"{CASE}/{CASE}_2_mask.tif")
    tifffile.imwrite(
        image_path(synthetic_kaggle_3m), image, photometric="rgb", compression=compression
    )
    tifffile.imwrite(mask_path(synthetic_kaggle_3m), mask * np.uint8(255), compression=compression)
    np.testing.assert_array_equal(kaggle3m.read_image(source, f"{CASE}/{CASE}_2.tif"), image)
    np.testing.assert_array_equal(kaggle3m.read_mask(source, f"{CASE}/{CASE}_2_mask.tif"), mask)


def test_masks_in_0_1_are_accepted(synthetic_kaggle_3m, tmp_path):
    mask = np.zeros((256, 256), np.uint8)
    mask[10:20, 10:20] = 1
    tifffile.imwrite(mask_path(synthetic_kaggle_3m), mask)
    source = kaggle3m.open_source(synthetic_kaggle_3m)
    np.testing.assert_array_equal(kaggle3m.read_mask(source, f"{CASE}/{CASE}_2_mask.tif"), mask)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: found no `kaggle_3m/` folder"):
        kaggle3m.open_source(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nowhere: no such file"):
        kaggle3m.open_source(tmp_path / "nowhere")


def test_zip_without_kaggle_3m_and_a_file_that_is_not_a_zip(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/cat.jpg", b"meow")
    with pytest.raises(DataError, match=r"other\.zip: the zip holds no `kaggle_3m/` folder"):
        kaggle3m.open_source(archive)
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"fake\.zip: a \.zip that cannot be opened"):
        kaggle3m.open_source(fake)
    cut = tmp_path / "cut.zip"  # a download cut short
    cut.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"cut\.zip: a \.zip that cannot be opened \(damaged"):
        kaggle3m.open_source(cut)
    plain = tmp_path / "notes.txt"
    plain.write_text("kaggle_3m")
    with pytest.raises(DataError, match=r"notes\.txt: not a folder and not a zip file"):
        kaggle3m.open_source(plain)


@pytest.mark.parametrize(
    "evil", ["kaggle_3m/../../escape.tif", "/kaggle_3m/abs.tif", "..\\\\x.tif"]
)
def test_zip_slip_members_are_refused_and_nothing_is_written_outside(
    evil, synthetic_kaggle_3m, tmp_path
):
    archive = tmp_path / "zips" / "lgg.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(synthetic_kaggle_3m.rglob("*")):
            if path.is_file():
                z.write(path, "kaggle_3m/" + path.relative_to(synthetic_kaggle_3m).as_posix())
        z.writestr(zipfile.ZipInfo(evil), b"II*\x00" + bytes(100))
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(DataError, match="escapes the archive"):
        dataset.prepare(data_config(archive, tmp_path / "tfds"))
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(str(p).startswith(str(tmp_path / "tfds")) for p in created), created
    assert not any("escape" in p.name or p.name == "abs.tif" for p in tmp_path.rglob("*"))
