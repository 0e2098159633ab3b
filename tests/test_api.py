"""The notebook-facing API: `import lggunet`, read_patient, volume_dice."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

import lggunet
from lggunet.errors import DataError


def test_public_names_resolve_and_import_stays_light():
    for name in lggunet.__all__:
        assert getattr(lggunet, name) is not None, name
    from lggunet import inference, scans

    assert lggunet.Model is inference.Model and lggunet.Ensemble is inference.Ensemble
    assert lggunet.Patient is scans.Patient
    assert lggunet.configs.cpu.get_config().data.cv_folds == 5
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = lggunet.nonsense
    code = (
        "import sys, lggunet; "
        "print(sorted(m for m in sys.modules if m.startswith(('jax', 'lggunet.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # `import lggunet` loads neither jax nor a submodule


def _write_patient(folder, sizes, masks=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images, truths = {}, {}
    for i, size in sizes.items():
        images[i] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        tifffile.imwrite(folder / f"{folder.name}_{i}.tif", images[i], photometric="rgb")
        if masks is True or (masks and i in masks):
            truths[i] = (rng.random(size) > 0.9).astype(np.uint8) * 255
            tifffile.imwrite(folder / f"{folder.name}_{i}_mask.tif", truths[i])
    return images, truths


def test_read_patient_gives_slices_in_numeric_order(tmp_path):
    folder = tmp_path / "TCGA_XX_0001_20000101"
    order = [3, 11, 1, 12, 2, 10, 4, 5, 6, 7, 8, 9]  # written out of order
    images, truths = _write_patient(folder, {i: (32, 40) for i in order})
    patient = lggunet.read_patient(str(folder))
    assert patient.name == folder.name
    assert patient.slice_numbers == list(range(1, 13))
    assert patient.images.shape == (12, 32, 40, 3) and patient.images.dtype == np.uint8
    assert patient.masks.shape == (12, 32, 40) and set(np.unique(patient.masks)) <= {0, 1}
    for k in range(12):
        np.testing.assert_array_equal(patient.images[k], images[k + 1])
        np.testing.assert_array_equal(patient.masks[k], truths[k + 1] // 255)
    assert repr(patient) == f"Patient('{folder.name}': 12 slices of 32x40, with masks)"
    assert patient.files[0].endswith(f"{folder.name}_1.tif")


def test_read_patient_without_masks_and_bad_folders(tmp_path):
    plain = tmp_path / "TCGA_XX_0002_20000101"
    _write_patient(plain, {1: (16, 16), 2: (16, 16)}, masks=False)
    assert lggunet.read_patient(plain).masks is None
    partial = tmp_path / "TCGA_XX_0003_20000101"
    _write_patient(partial, {1: (16, 16), 2: (16, 16)}, masks={1})
    with pytest.raises(DataError, match=r"_2\.tif: has no _mask\.tif beside it while 1 of the 2"):
        lggunet.read_patient(partial)
    mixed = tmp_path / "TCGA_XX_0004_20000101"
    _write_patient(mixed, {1: (16, 16), 2: (16, 24)})
    with pytest.raises(DataError, match="slices of different sizes in one patient"):
        lggunet.read_patient(mixed)
    with pytest.raises(DataError, match="holds 3 volumes"):
        lggunet.read_patient(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tif images"):
        lggunet.read_patient(tmp_path / "empty")


def test_volume_dice_against_a_hand_computed_case():
    true = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    true[0, :2, :2] = 1  # 4 voxels
    pred[0, :2, :] = 1  # 8 voxels, 4 shared
    assert lggunet.volume_dice(true, pred) == pytest.approx(2 * 4 / 12)
    assert lggunet.volume_dice(np.zeros(3), np.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        lggunet.volume_dice(true, pred[:1])
    assert lggunet.volume_dice(true * 255, pred.astype(bool)) == pytest.approx(2 * 4 / 12)
    with pytest.raises(ValueError, match="threshold probabilities first"):
        lggunet.volume_dice(true, pred * np.float32(0.7) + np.float32(0.1))


def test_read_patient_orders_any_numbered_names_and_refuses_gaps(tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = {i: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(1, 12)}
    for i, image in images.items():
        tifffile.imwrite(folder / f"slice{i}.tif", image, photometric="rgb")
    patient = lggunet.read_patient(folder)
    assert patient.slice_numbers == list(range(1, 12))
    np.testing.assert_array_equal(patient.images[9], images[10])
    (folder / "slice5.tif").unlink()
    with pytest.raises(DataError, match=r"slice\(s\) 5 missing between 1 and 11"):
        lggunet.read_patient(folder)
    tifffile.imwrite(folder / "slice05.tif", images[5], photometric="rgb")
    tifffile.imwrite(folder / "slice005.tif", images[5], photometric="rgb")
    with pytest.raises(DataError, match="slice number 5 is used twice"):
        lggunet.read_patient(folder)
