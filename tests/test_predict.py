"""--mode=predict and --mode=evaluate as a user runs them, and the Python API beside them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

import lggunet
from lggunet import inference, postprocessing, train
from tests.helpers.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny U-Net trained for one epoch on the phantom: its workdir."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(root / "tfds")
    config.data.phantom_patients = 6
    config.data.phantom_slices = 10
    config.num_epochs = 1
    train.train_and_evaluate(config, str(root / "run"))
    return root / "run"


def run(args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), "--config=configs/demo.py", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def predict_cli(workdir, input_path, output):
    return run(
        [f"--workdir={workdir}", "--mode=predict", f"--input={input_path}", f"--output={output}"]
    )


def predict_cli_with(workdir, input_path, output, *extra):
    return run(
        [
            f"--workdir={workdir}",
            "--mode=predict",
            f"--input={input_path}",
            f"--output={output}",
            *extra,
        ]
    )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_real_patient_folder(trained, real_data, tmp_path):
    patient = sorted(p for p in real_data.iterdir() if p.is_dir())[0]
    images = sorted(p for p in patient.glob("*.tif") if not p.name.endswith("_mask.tif"))
    out = tmp_path / "out"
    result = predict_cli(trained, patient, out)
    assert result.returncode == 0, result.stderr[-3000:]
    masks = sorted(out.glob("*_pred_mask.tif"))
    assert [m.name for m in masks] == sorted(f"{p.stem}_pred_mask.tif" for p in images)
    assert not list(out.glob("*_mask_pred_mask.tif"))  # ground truth is not predicted on
    slices_with_tumour, area, inter, true_area = 0, 0, 0, 0
    for m in masks:
        mask = tifffile.imread(m)
        truth = tifffile.imread(patient / m.name.replace("_pred_mask.tif", "_mask.tif")) > 0
        inter += int((truth & (mask > 0)).sum())
        true_area += int(truth.sum())
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        slices_with_tumour += int(mask.any())
        area += int((mask > 0).sum())
        with Image.open(out / m.name.replace("_pred_mask.tif", "_overlay.png")) as png:
            png.verify()
            assert png.format == "PNG" and png.size == (256, 256)
    (row,) = read_csv(out / "volumes.csv")
    assert row["patient"] == patient.name
    assert int(row["slices"]) == len(images)
    assert int(row["slices_with_tumour"]) == slices_with_tumour
    assert int(row["tumour_voxels"]) == area
    assert int(row["true_voxels"]) == true_area
    assert row["tumour_mm3"] == row["tumour_ml"] == row["hd95_mm"] == ""  # no spacing given
    expected = 1.0 if true_area + area == 0 else 2 * inter / (true_area + area)
    assert float(row["dice"]) == pytest.approx(expected, abs=1e-6)
    # The stacked volume: slices in numeric order (1, 2, ..., 10, not 1, 10, 11, 2).
    nifti = nib.load(out / f"{patient.name}_pred_mask.nii.gz")
    data = np.asarray(nifti.dataobj)
    assert data.shape == (256, 256, len(images)) and data.dtype == np.uint8
    for k in range(len(images)):
        mask = tifffile.imread(out / f"{patient.name}_{k + 1}_pred_mask.tif")
        np.testing.assert_array_equal(data[:, :, k].T, mask > 0)
    assert nifti.header.get_zooms() == (1.0, 1.0, 1.0)
    with Image.open(out / f"{patient.name}_montage.png") as png:
        png.verify()


def _surface_distances_brute_force(a, b, spacing):
    """Distances (in mm) from each surface voxel of a to the nearest surface voxel of b."""
    from scipy import ndimage

    def surface(m):
        return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1))

    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def test_spacing_gives_millimetres_millilitres_and_a_nifti_in_mm(trained, tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "in" / "TCGA_XX_0007_20000101"
    folder.mkdir(parents=True)
    for i in range(1, 13):  # 12 slices: numeric and text order differ
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        tifffile.imwrite(folder / f"TCGA_XX_0007_20000101_{i}.tif", image, photometric="rgb")
        truth = np.zeros((64, 64), np.uint8)
        truth[10 + i : 30 + i, 20:40] = 255
        tifffile.imwrite(folder / f"TCGA_XX_0007_20000101_{i}_mask.tif", truth)
    out = tmp_path / "out"
    result = run(
        [f"--workdir={trained}", "--mode=predict", f"--input={folder}", f"--output={out}",
         "--config.predict.pixel_spacing_mm=0.5", "--config.predict.slice_thickness_mm=2.5",
         "--config.predict.threshold=0.3"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_csv(out / "volumes.csv")
    preds = np.stack(
        [tifffile.imread(out / f"{folder.name}_{i}_pred_mask.tif") > 0 for i in range(1, 13)]
    )
    truths = np.stack(
        [tifffile.imread(folder / f"{folder.name}_{i}_mask.tif") > 0 for i in range(1, 13)]
    )
    voxels = int(preds.sum())
    assert int(row["tumour_voxels"]) == voxels
    assert float(row["tumour_mm3"]) == pytest.approx(voxels * 0.5 * 0.5 * 2.5)
    assert float(row["tumour_ml"]) == pytest.approx(voxels * 0.625 / 1000, abs=1e-6)
    assert (row["pixel_spacing_mm"], row["slice_thickness_mm"]) == ("0.5", "2.5")
    nifti = nib.load(out / f"{folder.name}_pred_mask.nii.gz")
    assert nifti.header.get_zooms() == (0.5, 0.5, 2.5)
    assert nifti.header.get_xyzt_units()[0] == "mm"
    # Radiological display assumed: columns run to the patient's left, rows to posterior.
    np.testing.assert_allclose(nifti.affine, np.diag([-0.5, -0.5, 2.5, 1.0]))
    assert nib.aff2axcodes(nifti.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), preds)
    if preds.any():
        spacing = (2.5, 0.5, 0.5)
        expected = max(
            np.percentile(_surface_distances_brute_force(truths, preds, spacing), 95),
            np.percentile(_surface_distances_brute_force(preds, truths, spacing), 95),
        )
        assert float(row["hd95_mm"]) == pytest.approx(expected, rel=1e-3)
    else:
        assert row["hd95_mm"] == "" and row["hd95_voxels"] == ""


def test_python_api_gives_the_same_masks_as_the_cli(trained, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in" / "TCGA_XX_0001_20000101"
    folder.mkdir(parents=True)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
    for i, image in enumerate(images, 1):
        tifffile.imwrite(folder / f"TCGA_XX_0001_20000101_{i}.tif", image, photometric="rgb")
    result = predict_cli(trained, tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    model = lggunet.load_model(trained)
    assert isinstance(model, inference.Model)
    api = lggunet.predict(np.stack(images), model)
    assert api.shape == (3, 256, 256) and api.dtype == np.uint8
    for i in range(3):
        cli = tifffile.imread(
            tmp_path / "out" / folder.name / f"TCGA_XX_0001_20000101_{i + 1}_pred_mask.tif"
        )
        np.testing.assert_array_equal(cli, api[i] * 255)
    # The small-component filter, through the CLI and the API alike.
    filtered = predict_cli_with(
        trained, tmp_path / "in", tmp_path / "out_f", "--config.predict.min_component_voxels=50"
    )
    assert filtered.returncode == 0, filtered.stderr[-3000:]
    api_f = lggunet.predict(np.stack(images), model, min_component_voxels=50)
    np.testing.assert_array_equal(api_f, postprocessing.drop_small_components(api, 50))
    for i in range(3):
        cli = tifffile.imread(
            tmp_path / "out_f" / folder.name / f"TCGA_XX_0001_20000101_{i + 1}_pred_mask.tif"
        )
        np.testing.assert_array_equal(cli, api_f[i] * 255)
    probs = model(images[0].astype(np.float32), scale=1)  # float input, its scale said
    np.testing.assert_array_equal((probs > 0.5).astype(np.uint8), api[0])
    probs = model(images[0] / np.float32(255), scale=255)  # in [0, 1]: equal up to rounding
    assert ((probs > 0.5) == api[0]).mean() > 0.999


def test_bad_inputs_are_named_and_the_good_ones_still_written(trained, tmp_path):
    folder = tmp_path / "in" / "TCGA_XX_0002_20000101"
    folder.mkdir(parents=True)
    good = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(folder / "TCGA_XX_0002_20000101_1.tif", good, photometric="rgb")
    tifffile.imwrite(folder / "TCGA_XX_0002_20000101_2.tif", good[..., 1])  # 1 channel
    (folder / "TCGA_XX_0002_20000101_3.tif").write_bytes(b"II*\x00garbage" * 10)  # corrupt
    odd = np.random.default_rng(2).integers(0, 256, (200, 180, 3), dtype=np.uint8)
    other = tmp_path / "in" / "TCGA_XX_0003_20000101"  # another size, all its slices alike
    other.mkdir()
    for i in (1, 2):
        tifffile.imwrite(other / f"TCGA_XX_0003_20000101_{i}.tif", odd, photometric="rgb")
    mixed = tmp_path / "in" / "TCGA_XX_0004_20000101"  # sizes differ in one patient: refused
    mixed.mkdir()
    tifffile.imwrite(mixed / "TCGA_XX_0004_20000101_1.tif", good, photometric="rgb")
    tifffile.imwrite(mixed / "TCGA_XX_0004_20000101_2.tif", odd, photometric="rgb")
    out = tmp_path / "out"
    result = predict_cli(trained, tmp_path / "in", out)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "TCGA_XX_0002_20000101_2.tif: 1 channel(s)" in result.stderr
    assert "TCGA_XX_0002_20000101_3.tif: unreadable TIFF" in result.stderr
    assert (
        "TCGA_XX_0004_20000101: slices of different sizes in one patient "
        "(256x256 in 1, 200x180 in 1" in result.stderr
    )
    assert "TCGA_XX_0002_20000101: 2 of its 3 slices could not be predicted" in result.stderr
    assert "4 problem(s) above; 3 of 7 images were predicted and written" in result.stderr
    assert "3 of 7 images predicted for 2 patients" in result.stderr
    written = sorted(p.name for p in (out / folder.name).glob("*_pred_mask.tif"))
    assert written == ["TCGA_XX_0002_20000101_1_pred_mask.tif"]
    assert not (out / folder.name / "TCGA_XX_0002_20000101_pred_mask.nii.gz").exists()
    assert not (out / mixed.name).exists()
    # Slices that are not 256x256 are resized for the model and their masks mapped back.
    mask = tifffile.imread(out / other.name / "TCGA_XX_0003_20000101_2_pred_mask.tif")
    assert mask.shape == (200, 180)
    volume = nib.load(out / other.name / "TCGA_XX_0003_20000101_pred_mask.nii.gz")
    assert volume.shape == (180, 200, 2)
    rows = {r["patient"]: r for r in read_csv(out / "volumes.csv")}
    assert sorted(rows) == ["TCGA_XX_0002_20000101", "TCGA_XX_0003_20000101"]
    assert int(rows["TCGA_XX_0002_20000101"]["slices"]) == 1


def test_empty_folder_and_missing_path_fail_clearly(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    result = predict_cli(trained, tmp_path / "empty", tmp_path / "out")
    assert result.returncode == 2 and "no .tif images to predict on" in result.stderr
    result = predict_cli(trained, tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in result.stderr
    cut = tmp_path / "cut.zip"  # a download cut short: not "not a zip"
    with zipfile.ZipFile(cut, "w") as archive:
        archive.writestr("P1/x_1.tif", os.urandom(4000))
    cut.write_bytes(cut.read_bytes()[:-30])
    result = predict_cli(trained, cut, tmp_path / "out")
    assert result.returncode == 2
    assert f"{cut}: a .zip that cannot be opened (damaged or cut short?)" in result.stderr


def test_zip_input_and_zip_slip_members(trained, tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    src = tmp_path / "slice.tif"
    tifffile.imwrite(src, image, photometric="rgb")
    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(src, "kaggle_3m/TCGA_XX_0003_20000101/TCGA_XX_0003_20000101_1.tif")
        z.write(src, "../escape.tif")
        z.write(src, "/abs/escape2.tif")
    out = tmp_path / "deep" / "out"
    result = predict_cli(trained, archive, out)
    assert result.returncode == 1
    assert "../escape.tif: path leaves the output folder" in result.stderr
    assert (
        out / "kaggle_3m" / "TCGA_XX_0003_20000101" / "TCGA_XX_0003_20000101_1_pred_mask.tif"
    ).exists()
    assert not list((tmp_path / "deep").glob("escape*")) and not Path("/abs").exists()


def test_evaluate_mode_writes_the_report(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    # Another eval batch on the command line: the run's own is kept, so the notebook's batch
    # metrics (smooth 100 over each batch) repeat training's final figures.
    stale = workdir / "report_slices_unseen.png"  # an earlier report's picture of a split
    stale.write_bytes(b"not this report's")  # that this one does not score
    result = run([f"--workdir={workdir}", "--mode=evaluate", "--config.eval_batch_size=4"])
    assert not stale.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    final = json.loads((workdir / "final_metrics.json").read_text())
    for split in ("validation", "test"):
        for key in ("dice", "iou", "accuracy"):
            got = report["splits"][split]["notebook"]["plain"][key]
            assert got == pytest.approx(final[split][key], rel=1e-5), (split, key)
    assert set(report["splits"]) == {"train", "validation", "test"}
    test = report["splits"]["test"]
    assert set(test["variants"]) == {"plain", "tta", "lcc", "tta+lcc"}
    assert set(test["notebook"]["plain"]) == {"loss", "accuracy", "dice", "iou"}
    rows = read_csv(workdir / "report_patients.csv")
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert sum(int(r["slices"]) for r in rows) == 60  # 6 phantom patients x 10 slices
    test_rows = [float(r["dice"]) for r in rows if r["split"] == "test"]
    assert test["variants"]["plain"]["volume_dice"]["mean"] == pytest.approx(np.mean(test_rows))
    for png in ("report_volume_dice.png", "report_slices_test.png"):
        with Image.open(workdir / png) as image:
            image.verify()
    assert "| test | plain |" in (workdir / "report.md").read_text()


def test_flat_folder_of_two_patients_and_macos_litter(trained, tmp_path):
    rng = np.random.default_rng(4)
    flat = tmp_path / "in"
    (flat / "__MACOSX").mkdir(parents=True)
    for case in ("TCGA_XX_0005_20000101", "TCGA_XX_0006_20000101"):
        for i in (1, 2):
            image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            tifffile.imwrite(flat / f"{case}_{i}.tif", image, photometric="rgb")
    (flat / "._TCGA_XX_0005_20000101_1.tif").write_bytes(b"\x00\x05\x16\x07 apple double")
    (flat / "__MACOSX" / "TCGA_XX_0005_20000101_1.tif").write_bytes(b"junk")
    (flat / "__MACOSX" / "TCGA_XX_0005_20000101_3.png").write_bytes(b"junk")
    Image.new("RGB", (256, 256)).save(flat / "TCGA_XX_0005_20000101_3.png")  # not a TIFF
    result = predict_cli(trained, flat, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 image file(s) not in TIFF format left aside (predict reads .tif slices): " in (
        result.stderr
    )
    assert "_3.png" in result.stderr and "__MACOSX/TCGA_XX_0005_20000101_3.png" not in (
        result.stderr
    )
    rows = read_csv(tmp_path / "out" / "volumes.csv")
    assert [(r["patient"], r["slices"]) for r in rows] == [
        ("TCGA_XX_0005_20000101", "2"),
        ("TCGA_XX_0006_20000101", "2"),
    ]
    assert all(r["dice"] == "" and r["true_voxels"] == "" for r in rows)  # no truth


def test_copied_channels_named_per_patient(trained, tmp_path):
    """A modality missing and filled with a copy is named in volumes.csv; one image in all three
    channels (4 of the 49 shared patients) is also warned about, two copies or none are not."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (2, 256, 256), dtype=np.uint8)
    other = rng.integers(0, 256, (2, 256, 256), dtype=np.uint8)
    third = rng.integers(0, 256, (2, 256, 256), dtype=np.uint8)
    volumes = {
        "TCGA_XX_0001_20000101": np.stack([base, base, base], -1),
        "TCGA_XX_0002_20000101": np.stack([other, base, base], -1),  # FLAIR = post-contrast
        "TCGA_XX_0003_20000101": np.stack([base, other, third], -1),
    }
    for name, slices in volumes.items():
        (tmp_path / "in" / name).mkdir(parents=True)
        for i, image in enumerate(slices, 1):
            tifffile.imwrite(tmp_path / "in" / name / f"{name}_{i}.tif", image, photometric="rgb")
    result = predict_cli(trained, tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["patient"]: r["copied_channels"] for r in read_csv(tmp_path / "out" / "volumes.csv")}
    assert rows == {
        "TCGA_XX_0001_20000101": "all three",
        "TCGA_XX_0002_20000101": "FLAIR=post-contrast",
        "TCGA_XX_0003_20000101": "",
    }
    assert "TCGA_XX_0001_20000101: all three channels hold the same image" in result.stderr
    assert result.stderr.count("channels hold the same image") == 1


def _slice(path: Path, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, photometric="rgb")


def test_links_fifos_and_clashing_names_in_the_input(trained, tmp_path):
    from lggunet import predict_files

    data = tmp_path / "in"
    (data / "P1").mkdir(parents=True)
    _slice(data / "P1" / "x_12.tif", 0)
    _slice(data / "P1" / "x_12.tiff", 1)  # same stem: both predicted, neither overwritten
    _slice(data / "P1" / "X_13.TIF", 2)
    (tmp_path / "elsewhere").mkdir()
    _slice(tmp_path / "elsewhere" / "y_1.tif", 3)
    (data / "P2").symlink_to(data / "P1")  # a patient folder linked inside: followed
    (data / "P3").symlink_to(tmp_path / "elsewhere")  # out of the input: named
    os.mkfifo(data / "P1" / "pipe.tif")  # named, never opened
    model = lggunet.load_model(trained)
    out = tmp_path / "out"
    result = predict_files.predict_path(model, data, out)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_pred_mask.tif"))
    assert written == [
        "P1/X_13_pred_mask.tif",
        "P1/x_12_tif_pred_mask.tif",
        "P1/x_12_tiff_pred_mask.tif",
    ]
    a, b = (tifffile.imread(out / "P1" / f"x_12_{e}_pred_mask.tif") for e in ("tif", "tiff"))
    np.testing.assert_array_equal(
        a, lggunet.predict(tifffile.imread(data / "P1" / "x_12.tif"), model) * 255
    )
    assert b.shape == (64, 64)
    text = "\n".join(result.failures)
    assert f"{data / 'P3'}: a symlink out of {data}" in text
    assert f"{data / 'P1' / 'pipe.tif'}: a FIFO (named pipe), not a file; never opened" in text
    assert f"{data / 'P2'}: a symlink loop" in text  # P1 listed once, under its own name
    assert "x: slice number 12 is used twice (x_12.tif, x_12.tiff)" in text  # no volume
    assert len(result.failures) == 4


def test_inputs_are_never_overwritten(trained, tmp_path):
    """Predicting into the input folder leaves every input byte for byte; a mask an earlier
    prediction wrote there (`*_pred_mask.tif`) is not an input, and is replaced."""
    from lggunet import predict_files

    data = tmp_path / "in"
    data.mkdir()
    _slice(data / "a_1.tif", 0)
    _slice(data / "b_1.tif", 1)
    tifffile.imwrite(data / "a_1_mask.tif", np.zeros((64, 64), np.uint8))
    tifffile.imwrite(data / "b_1_pred_mask.tif", np.full((64, 64), 7, np.uint8))  # stale
    inputs = {p.name: p.read_bytes() for p in data.iterdir() if "_pred_" not in p.name}
    model = lggunet.load_model(trained)
    result = predict_files.predict_path(model, data, data)
    assert not result.failures
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name in inputs} == inputs
    fresh = tifffile.imread(data / "b_1_pred_mask.tif")
    np.testing.assert_array_equal(
        fresh, lggunet.predict(tifffile.imread(data / "b_1.tif"), model) * 255
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--config.predict.threshold=1.5"], "predict.threshold=1.5 is out of range"),
        (["--config.predict.pixel_spacing_mm=0.5"], "give both (a voxel's three sides)"),
        (["--config.predict.slice_thickness_mm=-1"], "slice_thickness_mm=-1.0 is out of range"),
        (["--config.log_every_steps=0"], "log_every_steps=0 is out of range"),
        (["--output=FILE"], "--output is a file, not a folder"),
        (["--input=MISSING"], "MISSING: no such file or folder (--input)"),
    ],
)
def test_predict_user_errors_are_one_line_exit_2(trained, tmp_path, extra, expected):
    (tmp_path / "FILE").write_text("keep")
    args = [
        f"--workdir={trained}",
        "--mode=predict",
        f"--input={trained}",
        f"--output={tmp_path / 'o'}",
    ]
    for e in extra:
        key = e.split("=")[0]
        value = e.split("=", 1)[1]
        value = str(tmp_path / value) if value in ("FILE", "MISSING") else value
        args = [a for a in args if not a.startswith(key + "=")] + [f"{key}={value}"]
    result = run(args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "FILE").read_text() == "keep"


def test_predicting_into_the_input_folder_twice_gives_the_same_outputs(trained, tmp_path):
    from lggunet import predict_files

    data = tmp_path / "same"
    data.mkdir()
    for i in range(3):
        _slice(data / f"TCGA_AA_0001_20000101_{i + 1}.tif", i)
    model = lggunet.load_model(trained)
    first = predict_files.predict_path(model, data, data)
    masks = {p.name: p.read_bytes() for p in data.glob("*_pred_mask.tif")}
    rows = read_csv(data / "volumes.csv")
    second = predict_files.predict_path(model, data, data)  # its own outputs are not inputs
    assert not first.failures and not second.failures
    assert {p.name: p.read_bytes() for p in data.glob("*_pred_mask.tif")} == masks
    assert len(masks) == 3 and read_csv(data / "volumes.csv") == rows


def test_zip_members_that_are_one_file_are_named(trained, tmp_path):
    from lggunet import predict_files

    _slice(tmp_path / "x.tif", 0)
    archive = tmp_path / "odd.zip"
    # Python's zipfile itself warns of the duplicate: the archive is odd on purpose.
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.write(tmp_path / "x.tif", "p/X_1.tif")
        zf.write(tmp_path / "x.tif", "p//X_1.tif")
        zf.write(tmp_path / "x.tif", "./p/X_1.tif")
    result = predict_files.predict_path(lggunet.load_model(trained), archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*_pred_mask.tif")) == [
        "X_1_pred_mask.tif"
    ]
    assert len(result.failures) == 2
    assert all("(one output path); skipped" in f for f in result.failures)


def test_slice_order_gaps_and_unusable_ground_truth_are_named(trained, tmp_path):
    """Slices stack in the order of the last number in their names; a volume whose order is
    not known (a gap, a number used twice) or whose truth cannot be used gets no NIfTI or
    Dice, and each reason is named (exit 1); the per-slice masks are still written."""
    rng = np.random.default_rng(5)

    def image():
        return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    data = tmp_path / "in"
    plain = data / "P1"  # names without the Kaggle pattern: slice1.tif ... slice12.tif
    plain.mkdir(parents=True)
    for i in range(1, 13):
        tifffile.imwrite(plain / f"slice{i}.tif", image(), photometric="rgb")
    gap = data / "P2"
    gap.mkdir()
    for i in (1, 2, 4):
        tifffile.imwrite(gap / f"P2_{i}.tif", image(), photometric="rgb")
    tifffile.imwrite(gap / "P2_3_mask.tif", np.zeros((64, 64), np.uint8))  # its image lost
    twice = data / "P3"
    twice.mkdir()
    tifffile.imwrite(twice / "a_1.tif", image(), photometric="rgb")
    tifffile.imwrite(twice / "a_01.tif", image(), photometric="rgb")
    lost_last = data / "P5"  # the last slice's image lost, its mask still there
    lost_last.mkdir()
    for i in (1, 2, 3):
        if i < 3:
            tifffile.imwrite(lost_last / f"P5_{i}.tif", image(), photometric="rgb")
        tifffile.imwrite(lost_last / f"P5_{i}_mask.tif", np.zeros((64, 64), np.uint8))
    grey = data / "P6"  # a grey level among the tumour pixels: not guessed at
    grey.mkdir()
    label16 = data / "P7"  # uint16 0 / 65535: one tumour value, scored
    label16.mkdir()
    rgba = data / "P8"  # an opaque alpha channel beside grey ones: scored
    rgba.mkdir()
    for i in (1, 2):
        for folder in (grey, label16):
            tifffile.imwrite(folder / f"{folder.name}_{i}.tif", image(), photometric="rgb")
        truth = np.zeros((64, 64), np.uint8)
        truth[10:20, 10:20] = 255
        truth[10, 10] = 7 if i == 2 else 255
        tifffile.imwrite(grey / f"P6_{i}_mask.tif", truth)
        tifffile.imwrite(label16 / f"P7_{i}_mask.tif", (truth > 0).astype(np.uint16) * 65535)
        tifffile.imwrite(rgba / f"P8_{i}.tif", image(), photometric="rgb")
        grey_alpha = np.dstack([(truth > 0) * np.uint8(255)] * 3 + [np.full_like(truth, 255)])
        tifffile.imwrite(rgba / f"P8_{i}_mask.tif", grey_alpha, photometric="rgb")
    odd_truth = data / "P4"
    odd_truth.mkdir()
    for i in (1, 2):
        tifffile.imwrite(odd_truth / f"c_{i}.tif", image(), photometric="rgb")
        tifffile.imwrite(odd_truth / f"c_{i}_mask.tif", np.zeros((32, 32), np.uint8))
    out = tmp_path / "out"
    result = predict_cli(trained, data, out)
    assert result.returncode == 1, result.stderr[-3000:]
    nifti = np.asarray(nib.load(out / "P1" / "P1_pred_mask.nii.gz").dataobj)
    for k in range(12):  # slice1, slice2, ..., slice12: not slice1, slice10, slice11, ...
        mask = tifffile.imread(out / "P1" / f"slice{k + 1}_pred_mask.tif") > 0
        np.testing.assert_array_equal(nifti[:, :, k].T, mask)
    err = result.stderr
    assert "P2_3_mask.tif: a ground-truth mask without its image" in err
    assert "P2: slice(s) 3 missing between 1 and 4: no NIfTI volume" in err
    assert "P3: slice number 1 is used twice" in err
    assert "c_1_mask.tif: mask is (32, 32), its image (64, 64); no Dice" in err
    assert not (out / "P2" / "P2_pred_mask.nii.gz").exists()
    assert (out / "P2" / "P2_4_pred_mask.tif").exists()
    rows = {r["patient"]: r for r in read_csv(out / "volumes.csv")}
    assert rows["P2"]["dice"] == rows["P4"]["dice"] == rows["P5"]["dice"] == ""
    assert "P6_2_mask.tif: mask values [0, 7, 255] are not 0 and one tumour value" in err
    assert rows["P6"]["dice"] == "" and rows["P7"]["true_voxels"] == "200"
    assert rows["P8"]["true_voxels"] == "200" and rows["P8"]["dice"] != ""
    assert rows["P2"]["missing_slices"] == rows["P5"]["missing_slices"] == "1"
    assert "P5: slice(s) 3 missing (a mask lost its image): no NIfTI volume" in err
    assert not (out / "P5" / "P5_pred_mask.nii.gz").exists()
    assert "P1: 12 slice(s) only" not in err and "P2: 3 slice(s) only" in err


def test_an_earlier_prediction_in_output_never_passes_for_this_runs(trained, tmp_path):
    """Predicting again into a folder that holds an earlier prediction: a slice or volume
    this run cannot write is absent afterwards, not the earlier run's file; volumes.csv is
    removed at the start and lists this run's patients only."""
    from lggunet import predict_files

    case = "TCGA_AA_0001_20000101"
    data, other, out = tmp_path / "in" / case, tmp_path / "other" / "P9", tmp_path / "out"
    data.mkdir(parents=True)
    other.mkdir(parents=True)
    for i in range(4):
        _slice(data / f"{case}_{i + 1}.tif", i)
        _slice(other / f"P9_{i + 1}.tif", 10 + i)
    model = lggunet.load_model(trained)
    assert not predict_files.predict_path(model, data.parent, out).failures
    predict_files.predict_path(model, other.parent, out)  # another patient, same folder
    assert [r["patient"] for r in read_csv(out / "volumes.csv")] == ["P9"]
    (data / f"{case}_2.tif").write_bytes(b"not a tiff")
    (data / f"{case}_4.tif").unlink()  # the last slice lost: its earlier outputs go too
    (out / "volumes.csv").write_text("an earlier run's\n")
    second = predict_files.predict_path(model, data.parent, out)
    assert any(f"{case}_2.tif: unreadable TIFF" in f for f in second.failures)
    assert not (out / case / f"{case}_2_pred_mask.tif").exists()
    assert not (out / case / f"{case}_2_overlay.png").exists()
    assert not (out / case / f"{case}_pred_mask.nii.gz").exists()
    assert not (out / case / f"{case}_montage.png").exists()
    assert not (out / case / f"{case}_4_pred_mask.tif").exists()
    assert not (out / case / f"{case}_4_overlay.png").exists()
    assert (out / case / f"{case}_3_pred_mask.tif").exists()
    rows = read_csv(out / "volumes.csv")
    assert [(r["patient"], r["missing_slices"], r["dice"]) for r in rows] == [(case, "1", "")]


def test_ctrl_c_during_predict_is_one_line_and_leaves_no_volumes_csv(trained, tmp_path):
    """Ctrl-C after the first patient (a KeyboardInterrupt raised where the second would be
    predicted, in the real command): exit 130, one line saying what OUT holds, no traceback,
    and no volumes.csv (an earlier run's is gone too) that would pass for this run's."""
    data, out = tmp_path / "in", tmp_path / "out"
    for p in range(3):
        (data / f"P{p}").mkdir(parents=True)
        for i in range(3):
            _slice(data / f"P{p}" / f"scan_{i + 1}.tif", 3 * p + i)
    out.mkdir()
    (out / "volumes.csv").write_text("an earlier run's\n")
    argv = ["run.py", "--config=configs/demo.py", f"--workdir={trained}", "--mode=predict"]
    argv += [f"--input={data}", f"--output={out}"]
    code = (
        "import runpy, sys\n"
        "from lggunet import predict_files\n"
        "real, calls = predict_files._predict_volume, []\n"
        "def interrupted(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(*args, **kwargs)\n"
        "predict_files._predict_volume = interrupted\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_path('run.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"interrupted: {out} holds part of the predictions and no volumes")
    assert "Traceback" not in result.stderr and not (out / "volumes.csv").exists()
    assert (out / "P0" / "scan_1_pred_mask.tif").exists()  # the first patient was written
    assert not (out / "P1").exists()


def test_a_patient_in_two_folders_is_said_once(trained, tmp_path, caplog):
    """The Kaggle zip holds kaggle_3m/ twice: each copy is predicted, and a warning says the
    rows are copies, not more patients."""
    from lggunet import predict_files

    case = "TCGA_AA_0001_20000101"
    for top in ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m"):
        folder = tmp_path / "in" / top / case
        folder.mkdir(parents=True)
        for i in range(2):
            _slice(folder / f"{case}_{i + 1}.tif", i)
    model = lggunet.load_model(trained)
    result = predict_files.predict_path(model, tmp_path / "in", tmp_path / "out")
    assert [r["patient"] for r in result.volumes] == [case, case]
    assert (
        f"1 patient(s) found in more than one folder, each copy predicted (e.g. {case} in "
        f"kaggle_3m/{case}, lgg-mri-segmentation/kaggle_3m/{case})" in caplog.text
    )
