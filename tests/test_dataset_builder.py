"""The tfds builder: real data counts and pixels, patient splits, zip == folder, staleness."""

import shutil
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile

from lggunet import dataset, kaggle3m
from lggunet.configs import unet
from lggunet.errors import DataError


def data_config(manual_dir, data_dir, **overrides) -> ml_collections.ConfigDict:
    config = unet.get_config().data
    config.manual_dir = str(manual_dir)
    config.data_dir = str(data_dir)
    config.update(overrides)
    return config


def all_examples(builder) -> dict[str, dict]:
    """key (case_slice) -> example, over every split."""
    out = {}
    for split, source in builder.as_data_source().items():
        for i in range(len(source)):
            ex = source[i]
            key = f"{ex['patient_id'].decode()}_{int(ex['slice_index'])}"
            out[key] = {**ex, "split": split}
    return out


def test_real_data_counts_splits_and_pixels(real_builder, real_data):
    splits = real_builder.info.splits
    assert sum(splits[s].num_examples for s in splits) == 909
    sources = real_builder.as_data_source()
    patients_by_split = {}
    for split, source in sources.items():
        ids = {source[i]["patient_id"].decode() for i in range(len(source))}
        patients_by_split[split] = ids
    all_ids = [p for ids in patients_by_split.values() for p in ids]
    assert len(all_ids) == len(set(all_ids)) == 29  # every patient in exactly one split
    assert {k: len(v) for k, v in patients_by_split.items()} == {
        "train": 23,
        "validation": 3,
        "test": 3,
    }
    assert real_builder.info.metadata["patients"] == {
        k: sorted(v) for k, v in patients_by_split.items()
    }
    # Masks in {0, 1}, and pixels identical to tifffile's own read of sampled source files.
    cases = {p.name[:12]: p for p in real_data.iterdir() if p.is_dir()}
    rng = np.random.default_rng(0)
    for source in sources.values():
        for i in rng.choice(len(source), 8, replace=False):
            ex = source[int(i)]
            assert set(np.unique(ex["mask"]).tolist()) <= {0, 1}
            assert ex["image"].shape == (256, 256, 3) and ex["mask"].shape == (256, 256, 1)
            folder = cases[ex["patient_id"].decode()]
            stem = f"{folder.name}_{int(ex['slice_index'])}"
            np.testing.assert_array_equal(ex["image"], tifffile.imread(folder / f"{stem}.tif"))
            mask = tifffile.imread(folder / f"{stem}_mask.tif")
            np.testing.assert_array_equal(ex["mask"][..., 0], (mask == 255).astype(np.uint8))
            assert ex["institution"].decode() == folder.name.split("_")[1]


def test_real_masks_count_tumour_slices(real_builder):
    positive = 0
    for source in real_builder.as_data_source().values():
        positive += sum(int(source[i]["mask"].any()) for i in range(len(source)))
    assert positive == 313  # SOURCE.md: 313 of the 909 masks are non-empty


def test_zip_and_folder_give_same_examples(synthetic_kaggle_3m, tmp_path):
    folder_builder = dataset.prepare(data_config(synthetic_kaggle_3m, tmp_path / "a"))
    zip_path = tmp_path / "lgg-mri-segmentation.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:  # nested one level, as Kaggle's zip
        for f in sorted(synthetic_kaggle_3m.rglob("*")):
            if f.is_file():
                zf.write(
                    f,
                    "lgg-mri-segmentation/kaggle_3m/"
                    + f.relative_to(synthetic_kaggle_3m).as_posix(),
                )
    zip_builder = dataset.prepare(data_config(zip_path, tmp_path / "b"))
    a, b = all_examples(folder_builder), all_examples(zip_builder)
    assert sorted(a) == sorted(b) and len(a) == 15
    for key in a:
        for field in ("image", "mask"):
            np.testing.assert_array_equal(a[key][field], b[key][field])
        assert a[key]["split"] == b[key]["split"]
    # The folder holding the zip works too.
    assert sorted(all_examples(dataset.prepare(data_config(tmp_path, tmp_path / "b")))) == sorted(a)


def test_split_is_deterministic_and_seeded(synthetic_kaggle_3m, tmp_path):
    cfg = dict(split_fractions=(0.6, 0.2, 0.2))
    first = dataset.prepare(data_config(synthetic_kaggle_3m, tmp_path / "a", **cfg))
    again = dataset.prepare(data_config(synthetic_kaggle_3m, tmp_path / "b", **cfg))
    assert first.info.metadata["patients"] == again.info.metadata["patients"]
    assert {k: len(v) for k, v in first.info.metadata["patients"].items()} == {
        "train": 3,
        "validation": 1,
        "test": 1,
    }
    seeds = {
        str(
            dataset.prepare(
                data_config(synthetic_kaggle_3m, tmp_path / "c", split_seed=s, **cfg)
            ).info.metadata["patients"]
        )
        for s in range(6)
    }
    assert len(seeds) > 1


def test_slice_split_is_explicit_and_leaky(synthetic_kaggle_3m, tmp_path):
    builder = dataset.prepare(
        data_config(
            synthetic_kaggle_3m, tmp_path / "a", split_mode="slice", split_fractions=(0.6, 0.2, 0.2)
        )
    )
    assert builder.info.metadata["split_mode"] == "slice"
    assert sum(s.num_examples for s in builder.info.splits.values()) == 15
    patients = builder.info.metadata["patients"]
    shared = set(patients["train"]) & (set(patients["validation"]) | set(patients["test"]))
    assert shared  # the same patients in several splits: why this mode is not the default


def test_changed_source_is_rebuilt_not_served_stale(synthetic_kaggle_3m, tmp_path):
    cfg = data_config(synthetic_kaggle_3m, tmp_path / "tfds", split_fractions=(0.6, 0.2, 0.2))
    before = dataset.prepare(cfg)
    case = synthetic_kaggle_3m / "TCGA_AA_0001_20000101"
    new = np.full((256, 256, 3), 7, np.uint8)
    tifffile.imwrite(case / "TCGA_AA_0001_20000101_2.tif", new, photometric="rgb")  # same size
    after = dataset.prepare(cfg)
    assert after.data_path != before.data_path
    assert after.info.metadata["fingerprint"] != before.info.metadata["fingerprint"]
    ex = all_examples(after)["TCGA_AA_0001_2"]
    np.testing.assert_array_equal(ex["image"], new)
    # A copy elsewhere is another source: recorded as such.
    other = tmp_path / "copy" / "kaggle_3m"
    shutil.copytree(synthetic_kaggle_3m, other)
    moved = dataset.prepare(data_config(other, tmp_path / "tfds", split_fractions=(0.6, 0.2, 0.2)))
    assert moved.info.metadata["source"] == str(other)


def test_interrupted_build_is_not_taken_as_complete(synthetic_kaggle_3m, tmp_path):
    cfg = data_config(synthetic_kaggle_3m, tmp_path / "tfds", split_fractions=(0.6, 0.2, 0.2))
    bad = synthetic_kaggle_3m / "TCGA_CC_0005_20000105" / "TCGA_CC_0005_20000105_3.tif"
    good = bad.read_bytes()
    bad.write_bytes(good[:1000])  # truncated: the build fails part-way
    with pytest.raises(DataError, match="TCGA_CC_0005_20000105_3.tif"):
        dataset.prepare(cfg)
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
    bad.write_bytes(good)
    builder = dataset.prepare(cfg)
    assert sum(s.num_examples for s in builder.info.splits.values()) == 15


def test_missing_data_says_where_to_put_it(tmp_path):
    config = unet.get_config().data
    config.data_dir = str(tmp_path / "tfds")
    with pytest.raises(DataError) as err:
        dataset.prepare(config)
    message = str(err.value)
    assert str(tmp_path / "tfds" / "downloads" / "manual" / "lgg_mri_segmentation") in message
    assert "--config.data.manual_dir" in message and "kaggle.com" in message


def test_offline_download_explains_manual_route(tmp_path, monkeypatch):
    import kagglehub

    def offline(handle):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    config = unet.get_config().data
    config.data_dir = str(tmp_path / "tfds")
    config.download = True
    with pytest.raises(DataError, match="no route to host") as err:
        dataset.prepare(config)
    assert "download it by hand" in str(err.value) and "\n" not in str(err.value)


def test_download_uses_kagglehub_path(synthetic_kaggle_3m, tmp_path, monkeypatch):
    import kagglehub

    calls = []

    def fake_download(handle):
        calls.append(handle)
        return str(synthetic_kaggle_3m.parent)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    config = unet.get_config().data
    config.data_dir = str(tmp_path / "tfds")
    config.download = True
    config.split_fractions = (0.6, 0.2, 0.2)
    builder = dataset.prepare(config)
    assert calls == ["mateuszbuda/lgg-mri-segmentation"]
    assert sum(s.num_examples for s in builder.info.splits.values()) == 15


def test_layout_errors_name_the_file(synthetic_kaggle_3m):
    case = synthetic_kaggle_3m / "TCGA_BB_0003_20000103"
    (case / "TCGA_BB_0003_20000103_2_mask.tif").unlink()
    with pytest.raises(DataError, match=r"TCGA_BB_0003_20000103_2\.tif: image without a mask"):
        kaggle3m.list_slices(kaggle3m.open_source(synthetic_kaggle_3m))
    with pytest.raises(DataError, match="no such file"):
        kaggle3m.open_source(Path(synthetic_kaggle_3m) / "nope")


def test_volume_statistics_and_tumour_area(real_builder, real_data):
    source = real_builder.as_data_source("test")
    ex = source[0]
    pid = ex["patient_id"].decode()
    folder = next(p for p in real_data.iterdir() if p.name.startswith(pid))
    images = [tifffile.imread(f) for f in folder.glob("*.tif") if not f.stem.endswith("_mask")]
    volume = np.stack(images).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(ex["volume_mean"], volume.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ex["volume_std"], volume.std(axis=0), rtol=1e-5)
    for i in range(len(source)):
        e = source[i]
        assert int(e["tumour_area"]) == int(e["mask"].sum())


def test_each_split_has_its_own_prepared_folder():
    from lggunet.datasets.lgg_mri_segmentation.lgg_mri_segmentation import make_config

    def name(fractions, **kw):
        return make_config("ab" * 32, split_fractions=fractions, **kw).name

    assert name((0.8, 0.1, 0.1)) == "patient-seed0-80-10-10-abababababababab"  # as before
    assert name((0.9, 0.0, 0.1)) != name((0.9, 0.004, 0.096))  # no validation vs one patient
    assert "-90-0p4-9p6-" in name((0.9, 0.004, 0.096))
    assert name((0.98, 0.01, 0.01), cv_folds=5).startswith("patient-seed0-98-1-1-cv5fold0-")
