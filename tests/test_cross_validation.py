"""Cross-validation end to end on the synthetic phantom: every patient tested once by a model
that never saw it, the report agrees with its own CSV, reruns resume, the folds ensemble."""

import csv
import json
import os

import numpy as np
import pytest
import tifffile

from lggunet import configuration, cross_validation, dataset, inference, predict_files, train
from lggunet.errors import ConfigError

PHANTOM_PATIENTS = [f"TCGA_PH_{i:04d}" for i in range(1, 5)]  # cv_config's 4


@pytest.fixture
def cv_config(tiny_config):
    config = tiny_config
    config.data.phantom_patients = 4
    config.data.phantom_slices = 6
    config.data.cv_folds = 2
    config.data.cv_fold = -1
    config.batch_size = 8
    config.eval_batch_size = 8
    config.summary_images = 1
    return config


def test_cross_validation_trains_every_fold_and_reports_each_patient_once(cv_config, tmp_path):
    workdir = tmp_path / "cv"
    result = cross_validation.run(cv_config, workdir)
    assert result is not None and result["folds"] == 2 and result["patients"] == 4

    tested = []
    for k in range(2):
        fold_dir = workdir / f"fold_{k}"
        assert (fold_dir / cross_validation.DONE_FILE).exists()
        builder = dataset.prepare(cross_validation.fold_config(cv_config, k).data)
        patients = builder.info.metadata["patients"]
        assert not set(patients["test"]) & set(patients["train"])
        assert not set(patients["test"]) & set(patients["validation"])
        tested += patients["test"]
    assert sorted(tested) == PHANTOM_PATIENTS

    with (workdir / "cv_patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in rows) == sorted(tested)
    dice = np.array([float(r["dice"]) for r in rows])
    plain = result["variants"]["plain"]
    assert plain["mean"] == pytest.approx(dice.mean())
    assert plain["median"] == pytest.approx(np.median(dice))
    assert plain["missed"] == int((dice < 0.1).sum())
    assert plain["ci95"][0] <= plain["mean"] <= plain["ci95"][1]
    on_disk = json.loads((workdir / "cv_report.json").read_text())
    assert on_disk["variants"]["plain"]["mean"] == pytest.approx(dice.mean())
    assert (workdir / "cv_report.md").read_text().startswith("# Cross-validation report")
    assert (workdir / "cv_volume_dice.png").stat().st_size > 0

    # A rerun trains nothing (every fold is done) and writes the same report.
    stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("fold_*/checkpoints/*")}
    again = cross_validation.run(cv_config, workdir)
    assert again["variants"]["plain"]["mean"] == pytest.approx(dice.mean())
    assert stamps == {p: p.stat().st_mtime_ns for p in workdir.glob("fold_*/checkpoints/*")}

    # The workdir loads as the ensemble of its folds: the mean of the fold models.
    ensemble = inference.load_model(workdir)
    assert isinstance(ensemble, inference.Ensemble) and len(ensemble.members) == 2
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    members = [inference.load_model(workdir / f"fold_{k}")(images) for k in range(2)]
    np.testing.assert_allclose(ensemble(images), np.mean(members, axis=0), atol=1e-6)
    folder = tmp_path / "new" / "TCGA_XX_0001_20000101"
    folder.mkdir(parents=True)
    for i, image in enumerate(images, 1):
        tifffile.imwrite(folder / f"TCGA_XX_0001_20000101_{i}.tif", image, photometric="rgb")
    out = predict_files.predict_path(ensemble, tmp_path / "new", tmp_path / "out")
    assert not out.failures and len(out.volumes) == 1
    written = tifffile.imread(
        tmp_path / "out" / folder.name / "TCGA_XX_0001_20000101_2_pred_mask.tif"
    )
    np.testing.assert_array_equal(written, (ensemble(images[1]) > 0.5) * 255)

    # Misuse is refused before anything is written, with a line that says what to do.
    changed = cross_validation.fold_config(cv_config, -1)
    changed.data.cv_folds = 3
    with pytest.raises(ConfigError, match="cv_folds 2 -> 3"):
        cross_validation.run(changed, workdir)
    with pytest.raises(ConfigError, match="fold 0 of a cross-validation"):
        cross_validation.run(cv_config, workdir / "fold_0")
    plain = cross_validation.fold_config(cv_config, -1)
    plain.data.cv_folds = 0
    with pytest.raises(ConfigError, match="holds a cross-validation run"):
        train.train_and_evaluate(plain, str(workdir))
    with pytest.raises(ConfigError, match="cv_fold=-1 means every fold"):
        train.train_and_evaluate(cv_config, str(tmp_path / "elsewhere"))
    assert json.loads((workdir / "config.json").read_text())["data"]["cv_folds"] == 2

    # --mode=evaluate needs no cv_folds on the command line: the run's settings are saved.
    again = cross_validation.evaluate(plain, workdir)
    assert again["patients"] == json.loads((workdir / "cv_report.json").read_text())["patients"]

    # Data that changed since a fold was done (one byte of a slice) is refused; a touched
    # file with the same content is the same data.
    source = next((tmp_path / "tfds" / "lgg_phantom").glob("*/kaggle_3m/*/*_1.tif"))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert cross_validation.run(cv_config, workdir) is not None  # folds skipped, report again
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF
    source.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="made with other fingerprint"):
        cross_validation.run(cv_config, workdir)

    # A fold's per-patient table that lost a row is caught, not averaged over fewer patients.
    table = workdir / "fold_0" / "report_patients.csv"
    kept = table.read_text()
    lines = kept.splitlines(keepends=True)
    test_line = next(i for i, line in enumerate(lines) if ",test," in line)
    table.write_text("".join(lines[:test_line] + lines[test_line + 1 :]))
    with pytest.raises(ConfigError, match="not fold 0's"):
        cross_validation.write_report(workdir)
    table.write_text(kept)

    # A fold still training (checkpoints, but not done) or without checkpoints stops the
    # ensemble with a clear message; the other fold still loads on its own.
    done = workdir / "fold_1" / cross_validation.DONE_FILE
    done.rename(workdir / "fold_1" / "aside.json")
    with pytest.raises(ConfigError, match="fold 1 of 2 is not finished"):
        inference.load_model(workdir)
    (workdir / "fold_1" / "aside.json").rename(done)
    (workdir / "fold_1" / "checkpoints").rename(workdir / "fold_1" / "moved")
    with pytest.raises(ConfigError, match="fold 1 of 2 is marked done .* delete .*fold_done"):
        inference.load_model(workdir)  # rerunning alone would skip the fold: say what to do
    done.rename(workdir / "fold_1" / "aside.json")
    with pytest.raises(ConfigError, match="fold 1 of 2 has no checkpoints"):
        inference.load_model(workdir)
    (workdir / "fold_1" / "aside.json").rename(done)
    assert isinstance(inference.load_model(workdir / "fold_0"), inference.Model)
    with pytest.raises(ConfigError, match="fold_0: not a cross-validation workdir"):
        inference.load_ensemble(workdir / "fold_0")


@pytest.mark.parametrize(
    "folds, fold, mode",
    [(1, -1, "patient"), (3, 3, "patient"), (3, -2, "patient"), (3, 0, "slice")],
)
def test_bad_cross_validation_settings_fail_before_any_work(cv_config, folds, fold, mode):
    cv_config.data.cv_folds, cv_config.data.cv_fold, cv_config.data.split_mode = folds, fold, mode
    with pytest.raises(ConfigError, match="cv_fold"):
        configuration.check(cv_config)


def test_bootstrap_interval_matches_a_direct_resampling():
    values = np.random.default_rng(1).random(20)
    lo, hi = cross_validation.bootstrap_ci(values, samples=2000, seed=3)
    idx = np.random.default_rng(3).integers(0, 20, (2000, 20))
    means = values[idx].mean(axis=1)
    assert (lo, hi) == (np.percentile(means, 2.5), np.percentile(means, 97.5))
    assert lo < values.mean() < hi
    assert cross_validation.is_a_series("TCGA_DU_A5TP") and not cross_validation.is_a_series(
        "TCGA_DU_5849"
    )


def test_intensity_augmentation_needs_z_scored_input(cv_config):
    cv_config.augment.preset = "buda2019_intensity"
    cv_config.data.normalize = "scale"
    with pytest.raises(ConfigError, match="z-scored"):
        configuration.check(cv_config)
    cv_config.data.normalize = "brain_zscore"
    configuration.check(cv_config)


def test_report_rows_name_copied_channels_per_patient():
    """report's per-patient rows (and so cv_patients.csv and the CV report's group) name the
    channels that hold one image over the whole volume, as kaggle3m.copied_channels does."""
    import jax.numpy as jnp

    from lggunet import kaggle3m, report, steps
    from lggunet.configs import demo

    rng = np.random.default_rng(0)

    def channels(kind):
        a, b, c = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
        return np.stack({"all": [a, a, a], "flair=post": [b, a, a], "none": [a, b, c]}[kind], -1)

    volumes = {  # P4: one slice a copy, the other not: not a copied volume
        "P1": [channels("all"), channels("all")],
        "P2": [channels("flair=post"), channels("flair=post")],
        "P3": [channels("none"), channels("none")],
        "P4": [channels("all"), channels("none")],
    }
    source = [
        {
            "image": image,
            "mask": np.zeros((16, 16, 1), np.uint8),
            "patient_id": pid.encode(),
            "slice_index": i,
            "tumour_area": 0,
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
            "brain_stats": np.zeros((6, 3), np.float32),
        }
        for pid, images in volumes.items()
        for i, image in enumerate(images)
    ]
    empty = steps.Weights(  # a 'network' that finds nothing
        params={}, batch_stats={}, apply_fn=lambda v, x, train: jnp.full((*x.shape[:3], 1), -9.0)
    )
    config = demo.get_config()
    config.data.image_size, config.eval_batch_size = 16, 3
    config.evaluate.largest_component = False
    _, rows, _ = report.score_split(report.score_source(empty, source, config, False), config)
    got = {r["patient"]: r["copied_channels"] for r in rows}
    assert got == {"P1": "all three", "P2": "FLAIR=post-contrast", "P3": "", "P4": ""}
    assert got == {pid: kaggle3m.copied_channels(images) for pid, images in volumes.items()}


def test_weak_patients_are_sorted_by_how_they_fail():
    """Per-patient precision and recall in report rows, and the CV report's count of weak
    patients (Dice < 0.7) that are under-segmented, on a network that marks exactly the
    pixels whose first channel is bright: hand-counted areas."""

    from lggunet import report, report_files, steps
    from lggunet.configs import demo

    def slice_(marked, tumour):
        image = np.zeros((16, 16, 3), np.uint8)
        image[marked] = 255
        mask = np.zeros((16, 16, 1), np.uint8)
        mask[tumour] = 1
        return image, mask

    block = np.s_[0:4, 0:4]
    volumes = {  # (marked, tumour): P1 marks half its 16-pixel tumour, P2 a 16-pixel square
        "P1": slice_(np.s_[0:2, 0:4], block),  # around its 4-pixel one, P3 nothing
        "P2": slice_(block, np.s_[0:2, 0:2]),
        "P3": slice_(np.s_[0:0], np.s_[0:2, 0:2]),
    }
    source = [
        {
            "image": image,
            "mask": mask,
            "patient_id": pid.encode(),
            "slice_index": 0,
            "tumour_area": int(mask.sum()),
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
            "brain_stats": np.zeros((6, 3), np.float32),
        }
        for pid, (image, mask) in volumes.items()
    ]
    marks = steps.Weights(  # 'scale' input: 1.0 where marked
        params={}, batch_stats={}, apply_fn=lambda v, x, train: (x[..., :1] - 0.5) * 18.0
    )
    config = demo.get_config()
    config.data.image_size, config.eval_batch_size = 16, 3
    config.evaluate.largest_component = False
    _, rows, _ = report.score_split(report.score_source(marks, source, config, False), config)
    got = {r["patient"]: (r["dice"], r["precision"], r["recall"]) for r in rows}
    assert got["P1"] == pytest.approx((2 * 8 / 24, 1.0, 0.5))
    assert got["P2"] == pytest.approx((2 * 4 / 20, 0.25, 1.0))
    assert got["P3"][0] == 0.0 and np.isnan(got["P3"][1]) and got["P3"][2] == 0.0

    weak = cross_validation._weak_patients(rows, "dice")
    assert weak["patients"] == 3 and weak["under_segmented"] == ["P1", "P3"]
    assert weak["mean_precision"] == pytest.approx((1.0 + 0.25) / 2)  # P3 marked nothing
    assert weak["mean_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    text = "\n".join(report_files._weak_lines({"variants": {"plain": {"weak": weak}}}))
    assert "| plain | 3 | 2 | 1 | 0.6250 | 0.5000 |" in text
    as_text = [{k: str(v) for k, v in r.items()} for r in rows]  # as a fold's CSV holds them
    again = cross_validation._weak_patients(as_text, "dice")
    assert again.pop("under_segmented") == weak.pop("under_segmented")
    assert again == pytest.approx(weak)
    assert cross_validation._weak_patients([{"dice": "0.5", "true_area": "9"}], "dice") is None


def test_a_fold_without_validation_trains_on_every_patient_outside_it(cv_config):
    cv_config.data.split_fractions = (0.9, 0.0, 0.1)
    tested = []
    for k in range(2):
        fold = dataset.prepare(cross_validation.fold_config(cv_config, k).data)
        patients = fold.info.metadata["patients"]
        assert patients["validation"] == [] and "validation" not in fold.info.splits
        assert sorted(patients["train"] + patients["test"]) == PHANTOM_PATIENTS
        tested += patients["test"]
    assert sorted(tested) == PHANTOM_PATIENTS
