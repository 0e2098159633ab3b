"""run.py as a user runs it: clear message and non-zero exit without data; demo trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_no_data_says_where_to_put_it(tmp_path):
    result = run(["--config=configs/unet.py", f"--workdir={tmp_path / 'w'}"], tmp_path)
    assert result.returncode != 0
    expected = tmp_path / "tfds" / "downloads" / "manual" / "lgg_mri_segmentation"
    last = result.stderr.strip().splitlines()[-1]  # one line: the problem and the fix
    assert last.startswith("error: no LGG data found")
    assert str(expected) in last and "--config.data.manual_dir" in last


def test_missing_manual_dir_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    result = run(
        [
            "--config=configs/unet.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.manual_dir={missing}",
        ],
        tmp_path,
    )
    assert result.returncode != 0
    assert f"{missing}: no such file or folder" in result.stderr


def test_demo_config_trains_on_the_phantom(tmp_path):
    workdir = tmp_path / "w"
    result = run(
        [
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            "--config.num_epochs=2",
            "--config.data.phantom_patients=10",
            "--config.data.phantom_slices=8",
            "--config.data.image_size=32",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "epoch 2/2" in result.stderr
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["test"]["num_slices"] == 8  # one phantom patient of 8 slices
    # A console people can read (stderr is a pipe here, as in a log file):
    console = result.stdout + result.stderr
    for noise in (
        "Unable to initialize backend 'tpu'",
        "Downloading and preparing",
        "Unknown size",
        "Using custom data configuration",
        "\x1b[",  # progress-bar escape codes
        "\r",
    ):
        assert noise not in console, noise
    assert max(map(len, console.splitlines())) < 400
    lines = result.stderr.splitlines()
    compiling = next(i for i, x in enumerate(lines) if "Compiling the train step" in x)
    compiled = next(i for i, x in enumerate(lines) if "Train step compiled and run in" in x)
    first_step = next(i for i, x in enumerate(lines) if " step " in x and "images/s" in x)
    assert compiling < compiled < first_step
    epoch_1 = next(x for x in lines if "epoch 1/2" in x)
    accuracy = float(epoch_1.split("accuracy ")[1].split("%")[0])
    assert abs(accuracy - 100 * records[0]["val_accuracy"]) < 0.006  # as in the reports: %


def test_help_lists_the_flags_and_usage_errors_are_one_line(tmp_path):
    result = run(["--help"], tmp_path)
    assert result.returncode == 0
    for flag in ("--config", "--workdir", "--mode", "--input", "--output"):
        assert flag in result.stdout, flag
    assert "'None'" not in result.stdout
    for args, expected in (
        (["--config=demo", "--workdir=w", "stray"], "unexpected argument(s) 'stray'"),
        (["--config=demo", "--workdir=w", "--config.data.nosuch=1"], "--config.data.nosuch:"),
        (["--config=demo", "--workdir=w", "--mode=fly"], "--mode=fly"),
        (["--workdir=w"], "--mode=train needs --config"),
        (["--config=demo"], "--mode=train needs --workdir"),
        (["--mode=evaluate"], "--mode=evaluate needs --workdir"),
        (["--mode=predict", "--workdir=", "--input=x", "--output=o"], "--workdir is empty"),
    ):
        result = run(args, tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [x for x in result.stderr.splitlines() if x[:1] not in ("I", "W")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
            args,
            result.stderr[-2000:],
        )


def test_unusable_data_dir_is_one_line_naming_the_setting(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    flag = run(
        [
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.data_dir={a_file}",
        ],
        tmp_path,
    )
    assert flag.returncode == 2
    assert flag.stderr.strip().splitlines()[-1] == (
        f"error: {a_file}: data.data_dir cannot be a folder ({a_file} is a file); "
        "point it at a folder"
    )
    env_path = tmp_path / "env"
    env_path.write_text("keep")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'v'}",
        ],
        cwd=REPO,
        env={**os.environ, "TFDS_DATA_DIR": str(env_path / "sub"), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "$TFDS_DATA_DIR cannot be a folder" in result.stderr.strip().splitlines()[-1]
    assert a_file.read_text() == env_path.read_text() == "keep"
