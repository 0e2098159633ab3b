"""The model inside the package: loads with no workdir, predicts from the command line with
no flags but input and output, refuses damaged weights, ships in the wheel, and round-trips
through export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

import lggunet
from lggunet import export_model, inference, pretrained, train
from lggunet.errors import ConfigError
from tests.helpers.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_model_loads_with_its_recipe():
    model = lggunet.load_model("pretrained")
    assert isinstance(model, inference.Model)
    assert (model.image_size, model.normalize, model.tta) == (128, "brain_zscore", True)
    assert "pretrained" in repr(model) and "1.94M parameters" in repr(model)
    assert len(repr(model)) < 300  # a summary, not the weights
    assert lggunet.load_model("pretrained", tta=False).tta is False
    for checkpoint in ("best", "last", 0, "latest"):
        with pytest.raises(ConfigError, match="packaged model is one checkpoint"):
            lggunet.load_model("pretrained", checkpoint=checkpoint)
    size = (pretrained.DIRECTORY / pretrained.WEIGHTS).stat().st_size
    assert size <= 10 * 2**20


def test_the_packaged_model_finds_tumours_on_real_scans(real_data):
    """Three of its training patients: a check that the weights are the trained ones (random
    or mis-loaded weights score near 0), not a held-out score (docs/model_card.md has those)."""
    model = lggunet.load_model("pretrained")
    scores = []
    for name in ("TCGA_CS_4941_19960909", "TCGA_DU_5851_19950428", "TCGA_HT_7605_19950916"):
        patient = lggunet.read_patient(real_data / name)
        scores.append(lggunet.volume_dice(patient.masks, lggunet.predict(patient.images, model)))
    assert np.mean(scores) > 0.6, scores


def test_damaged_or_missing_weights_are_refused(tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(pretrained.DIRECTORY, copy)
    data = bytearray((copy / pretrained.WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / pretrained.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="packaged weights are damaged"):
        pretrained.read(copy)
    (copy / pretrained.WEIGHTS).unlink()
    with pytest.raises(ConfigError, match="cannot be read"):
        pretrained.read(copy)
    (copy / pretrained.RECORD).unlink()
    with pytest.raises(ConfigError, match="record cannot be read"):
        pretrained.read(copy)


def test_predict_with_no_workdir_and_no_config_uses_the_packaged_model(tmp_path):
    folder = tmp_path / "in" / "TCGA_XX_0001_20000101"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        tifffile.imwrite(folder / f"TCGA_XX_0001_20000101_{i}.tif", image, photometric="rgb")
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "--mode=predict", f"--input={folder}",
         f"--output={out}", "--config.predict.pixel_spacing_mm=0.9",
         "--config.predict.slice_thickness_mm=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predicting with the packaged model" in result.stderr
    assert "tta=True" in result.stderr  # the recipe's own predict setting
    assert "3 of 3 images predicted for 1 patient:" in result.stderr
    masks = sorted(out.glob("*_pred_mask.tif"))
    assert len(masks) == 3
    model = lggunet.load_model("pretrained")
    images = np.stack(
        [tifffile.imread(folder / f"TCGA_XX_0001_20000101_{i}.tif") for i in (1, 2, 3)]
    )
    expected = lggunet.predict(images, model) * 255
    for i in (1, 2, 3):
        np.testing.assert_array_equal(
            tifffile.imread(out / f"TCGA_XX_0001_20000101_{i}_pred_mask.tif"), expected[i - 1]
        )
    assert (out / "TCGA_XX_0001_20000101_pred_mask.nii.gz").exists()


def test_export_round_trip_gives_the_same_probabilities(tmp_path):
    config = tiny_config(tmp_path / "tfds")
    config.data.phantom_patients = 4
    config.data.phantom_slices = 4
    config.num_epochs = 1
    config.summary_images = 0
    train.train_and_evaluate(config, str(tmp_path / "run"))
    export_model.export(tmp_path / "run", tmp_path / "weights", training_data="phantom")
    cfg, variables, record = pretrained.read(tmp_path / "weights")
    assert cfg.data.manual_dir == "" and cfg.data.data_dir == ""  # no paths of this machine
    assert record["name"] == "pretrained" and record["step"] > 0
    original = lggunet.load_model(tmp_path / "run", tta=False)
    copy = inference.Model(
        module=original.module,
        variables=variables,
        image_size=cfg.data.image_size,
        normalize=cfg.data.normalize,
    )
    images = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(original(images), copy(images))


def test_export_errors_are_one_line_and_out_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_model.main([str(tmp_path / "nope"), "--out", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]
    with pytest.raises(SystemExit):  # no --out: the packaged weights are never the default
        export_model.main([str(tmp_path)])
    assert not list(tmp_path.glob("w*"))


def test_the_wheel_carries_the_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lggunet-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = {i.filename: i.file_size for i in zf.infolist()}
    assert names.get(f"lggunet/weights/{pretrained.WEIGHTS}", 0) > 1_000_000
    assert f"lggunet/weights/{pretrained.RECORD}" in names
    assert wheel.stat().st_size <= 12 * 2**20
