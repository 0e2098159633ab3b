"""A workdir is never damaged or mislabelled: the lock, the resume check and splits.json."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from lggunet import inference, report, train, workdirs
from lggunet.errors import ConfigError
from tests.conftest import write_case


def _on_folder(config, folder):
    config.data.manual_dir = str(folder)
    config.data.phantom = False
    config.data.split_fractions = (0.6, 0.2, 0.2)
    return config


def test_rerun_with_other_settings_is_refused_before_anything_is_written(
    tiny_config, synthetic_kaggle_3m, tmp_path
):
    config = _on_folder(tiny_config, synthetic_kaggle_3m)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))

    def files():  # every file but the lock, which names its latest holder
        return {
            p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.name != ".lock"
        }

    before = files()

    other = _on_folder(type(config)(config.to_dict()), synthetic_kaggle_3m)
    other.model.features = 8
    other.learning_rate = 0.5
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(other, str(workdir))
    message = str(e.value)
    assert "model.features: 4 -> 8" in message and "learning_rate" in message
    assert "use another workdir" in message and "\n" not in message
    assert files() == before  # config.json untouched
    assert inference.load_model(workdir).step > 0  # the trained model still loads

    # Fields that do not change what was trained may differ: more epochs resume the run.
    longer = _on_folder(type(config)(config.to_dict()), synthetic_kaggle_3m)
    longer.num_epochs = 2
    train.train_and_evaluate(longer, str(workdir))
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 2
    epochs = [json.loads(x)["epoch"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_second_training_in_a_busy_workdir_stops_at_once(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    with workdirs.locked(workdir):
        with pytest.raises(workdirs.WorkdirBusy, match="another training run is using"):
            train.train_and_evaluate(tiny_config, str(workdir))
        assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
        assert f"pid {__import__('os').getpid()}" in (workdir / ".lock").read_text()
    # Released when the holder ends: the next run goes ahead.
    train.train_and_evaluate(tiny_config, str(workdir))
    assert (workdir / "final_metrics.json").exists()


def test_a_file_as_workdir_is_one_clear_error(tiny_config, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train.train_and_evaluate(tiny_config, str(path))
    assert path.read_text() == "keep me"


def test_evaluate_on_other_data_never_calls_a_training_patient_test(
    tiny_config, synthetic_kaggle_3m, tmp_path
):
    config = _on_folder(tiny_config, synthetic_kaggle_3m)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    recorded = json.loads((workdir / "splits.json").read_text())
    assert sorted(p for v in recorded["patients"].values() for p in v) == sorted(
        d.name[:12] for d in synthetic_kaggle_3m.iterdir() if d.is_dir()
    )
    split_of = workdirs.label_patients(recorded)

    # Other data: two of the training patients, one test patient and two new ones.
    other = tmp_path / "other" / "kaggle_3m"
    other.mkdir(parents=True)
    keep = [p for p in split_of if split_of[p] == "train"][:2]
    keep += [p for p in split_of if split_of[p] == "test"]
    for folder in synthetic_kaggle_3m.iterdir():
        if folder.name[:12] in keep:
            shutil.copytree(folder, other / folder.name)
    write_case(other, "TCGA_DD_0006_20000106", 3, seed=6)
    write_case(other, "TCGA_DD_0007_20000107", 3, seed=7)
    config.data.manual_dir = str(other)
    result = report.evaluate_run(config, workdir)

    with (workdir / "report_patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = {r["patient"]: r["split"] for r in rows}
    assert set(labels) == set(keep) | {"TCGA_DD_0006", "TCGA_DD_0007"}
    for patient, label in labels.items():
        assert label == split_of.get(patient, "unseen"), (patient, label)
    assert set(result["splits"]) == {"train", "test", "unseen"}
    assert result["data"]["trained_on"] == str(synthetic_kaggle_3m)
    assert "never saw are under `unseen`" in (workdir / "report.md").read_text()


def test_resuming_on_data_that_splits_otherwise_is_refused(
    tiny_config, synthetic_kaggle_3m, tmp_path
):
    config = _on_folder(tiny_config, synthetic_kaggle_3m)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    write_case(synthetic_kaggle_3m, "TCGA_DD_0006_20000106", 3, seed=6)
    config.num_epochs = 2
    with pytest.raises(ConfigError, match="trained on another split of other data"):
        train.train_and_evaluate(config, str(workdir))
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 1


def test_config_differences_ignore_free_fields_and_fields_older_runs_lack(tiny_config):
    saved = json.loads(tiny_config.to_json_best_effort())
    # Fields an older lggunet had not: they compare as the values such runs trained with.
    del saved["model"]["bn_momentum"], saved["model"]["output_bias"]
    del saved["data"]["split_seed"]  # not a field added later (configuration.ADDED): skipped
    config = type(tiny_config)(tiny_config.to_dict())
    config.num_epochs = 50
    config.predict.threshold = 0.3
    config.data.manual_dir = "/elsewhere"
    config.data.split_seed = 7
    config.host_devices = 0  # one device per core: a resumed run may change it
    assert (config.model.bn_momentum, config.model.output_bias) == (0.99, 0.0)
    assert workdirs.config_differences(saved, config) == []
    config.model.output_bias = -4.0  # the old run's model started from bias 0
    assert workdirs.config_differences(saved, config) == ["model.output_bias: 0.0 -> -4.0"]
    config.model.output_bias = 0.0
    config.data.image_size = 64
    config.augment.enabled = not config.augment.enabled
    assert workdirs.config_differences(saved, config) == [
        f"augment.enabled: {tiny_config.augment.enabled!r} -> {config.augment.enabled!r}",
        "data.image_size: 32 -> 64",
    ]


def test_damaged_or_missing_run_files_are_one_line_errors(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config, str(workdir))
    config_text = (workdir / "config.json").read_text()

    # Checkpoints without config.json: a rerun with other settings cannot be checked, so it
    # is refused, and nothing is written (the checkpoints stay usable with the config back).
    (workdir / "config.json").unlink()
    other = type(tiny_config)(tiny_config.to_dict())
    other.model.features = 8
    with pytest.raises(ConfigError, match="holds checkpoints but no config.json"):
        train.train_and_evaluate(other, str(workdir))
    assert not (workdir / "config.json").exists()
    (workdir / "config.json").write_text(config_text)
    assert inference.load_model(workdir).step > 0

    # config.json that is JSON of the wrong shape, or out of range.
    for text in ("[1, 2]", "{}", '{"data": {"cv_folds": "x"}}'):
        (workdir / "config.json").write_text(text)
        with pytest.raises(ConfigError, match="config.json: not a "):
            inference.load_model(workdir)
    bad = json.loads(config_text)
    bad["model"]["depth"] = 50
    (workdir / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="model.depth=50 is out of range"):
        inference.load_model(workdir)
    (workdir / "config.json").write_text(config_text)

    # splits.json of the wrong shape.
    kept = (workdir / "splits.json").read_text()
    for text in ('{"patients": 5}', '{"patients": {"train": 5}}', "[]"):
        (workdir / "splits.json").write_text(text)
        with pytest.raises(ConfigError, match="splits.json: unreadable"):
            report.evaluate_run(tiny_config, workdir)
    (workdir / "splits.json").write_text(kept)


def test_a_leftover_splits_json_without_checkpoints_is_replaced(
    tiny_config, synthetic_kaggle_3m, tmp_path
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "splits.json").write_text(
        json.dumps({"patients": {"train": ["TCGA_ZZ_0000"]}, "source": "x", "fingerprint": "y"})
    )
    train.train_and_evaluate(_on_folder(tiny_config, synthetic_kaggle_3m), str(workdir))
    assert json.loads((workdir / "splits.json").read_text())["source"] == str(synthetic_kaggle_3m)


def test_evaluate_on_one_new_patient_and_a_workdir_inside_checkpoints(
    tiny_config, synthetic_kaggle_3m, tmp_path
):
    config = _on_folder(tiny_config, synthetic_kaggle_3m)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    one = tmp_path / "one" / "kaggle_3m"
    write_case(one, "TCGA_DD_0006_20000106", 3, seed=6)  # too few to split, and never seen
    config.data.manual_dir = str(one)
    result = report.evaluate_run(config, workdir)
    assert set(result["splits"]) == {"unseen"}
    assert result["splits"]["unseen"]["num_volumes"] == 1

    for inside in (workdir / "checkpoints", workdir / "checkpoints" / "x"):
        with pytest.raises(ConfigError, match="is inside the checkpoints of the run"):
            train.train_and_evaluate(tiny_config, str(inside))


def test_a_cosine_run_may_not_change_its_length_on_resume():
    from lggunet.configs import cpu

    saved = json.loads(cpu.get_config().to_json_best_effort())
    longer = cpu.get_config()
    longer.num_epochs += 5
    saved["lr_schedule"] = longer.lr_schedule = "plateau"
    assert workdirs.config_differences(saved, longer) == []  # plateau: more epochs resume
    saved["lr_schedule"] = longer.lr_schedule = "cosine"
    assert workdirs.config_differences(saved, longer) == [
        f"num_epochs: {saved['num_epochs']} -> {longer.num_epochs}"
    ]
