"""The command line: train a U-Net on the LGG MRI Segmentation data, evaluate it, predict
with it. `run.py` in the repository and the `lggunet` console script both run `main`.

lggunet --config=configs/unet.py --config.data.manual_dir=PATH --workdir=runs/unet
lggunet --config=demo --workdir=runs/demo     # synthetic phantom, no download
lggunet --config=demo --workdir=runs/demo --mode=evaluate
lggunet --config=demo --workdir=runs/demo --mode=predict --input=P --output=O
lggunet --mode=predict --input=P --output=O     # the packaged pretrained model

`--config` takes a config file, or the name of one in `lggunet.configs` (unet, cpu, demo, gpu);
`configs/<name>.py` names the packaged one when no such file is in the current folder.
Training needs it; predict and evaluate without it use the run's own saved settings.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import lggunet.configs
from lggunet import (
    configuration,
    cross_validation,
    inference,
    parallel,
    predict_files,
    report,
    train,
    volume_files,
    walk,
    workdirs,
)
from lggunet.errors import ConfigError, DataError, LggUnetError
from lggunet.interrupts import Interrupted

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (e.g. configs/unet.py) or packaged config name (unet, cpu, demo, gpu); "
    "override fields with --config.x=y. Required to train; predict and evaluate default to "
    "the run's saved settings.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir",
    None,
    "The run's folder: checkpoints, metrics.jsonl, reports. Required to train and evaluate; "
    "predict without it uses the packaged pretrained model.",
)
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "predict"],
    "train: train (resuming from the workdir), then score the best checkpoint on validation "
    "and test; with data.cv_folds > 1, one model per fold and cv_report.md. evaluate: write "
    "report.json/report.md/report_patients.csv and pictures for the best checkpoint on every "
    "split (cross-validation: every fold, then cv_report.md). predict: masks for --input "
    "into --output (a cross-validation workdir predicts with its fold ensemble).",
)
flags.DEFINE_string(
    "input",
    None,
    "predict: a .tif slice, a patient folder, a kaggle_3m-style folder of patients, or a zip.",
)
flags.DEFINE_string(
    "output", None, "predict: where <stem>_pred_mask.tif, overlays and volumes.csv go."
)
flags.DEFINE_bool(
    "verbose", False, "On a user error (bad data, config or path), also print the traceback."
)

_CONFIG_GIVEN = True  # False when --config was left out (predict, evaluate): unet's defaults


class _QuietLibraries(pylogging.Filter):
    """Hides libraries' chatter that says nothing to a user: orbax's INFO (a dozen lines per
    checkpoint), jax's failed probe for a TPU, tfds's 600-character config dump and its advice
    to install OpenCV. Other warnings still show."""

    NOISE = (
        "Unable to initialize backend",
        "Using custom data configuration",
        "OpenCV is not installed",
        "Done writing",
        "Generating dataset",
        "Requested `tracked_metric`",  # orbax, on each save of a run without validation
    )

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno < pylogging.WARNING and "/orbax/" in record.pathname:
            return False
        message = str(record.msg)
        return record.levelno >= pylogging.ERROR or not message.startswith(self.NOISE)


def _predict_settings(model) -> ml_collections.ConfigDict:
    """`predict.*`: the --config file's when one was given, else the model's own recipe's
    (the run's config.json, or the packaged model's); --config.predict.x=y overrides either."""
    recipe = (model.members[0] if isinstance(model, inference.Ensemble) else model).config
    given = _CONFIG_GIVEN or recipe is None
    settings = ml_collections.ConfigDict((FLAGS.config if given else recipe).predict.to_dict())
    for key, value in config_flags.get_override_values(FLAGS["config"]).items():
        if key.startswith("predict."):
            settings[key.removeprefix("predict.")] = value
    configuration.check_ranges(ml_collections.ConfigDict({"predict": settings.to_dict()}))
    return settings


def _predict() -> int:
    if not FLAGS.input or not FLAGS.output:
        raise ConfigError("--mode=predict needs --input=PATH and --output=DIR")
    if not os.path.lexists(Path(FLAGS.input).expanduser()):
        raise DataError(f"{FLAGS.input}: no such file or folder (--input)")
    if FLAGS.workdir and not workdirs.is_cv_workdir(FLAGS.workdir):
        workdirs.find_checkpoints(FLAGS.workdir)  # a missing run is named before --output
    workdirs.make_writable_dir(Path(FLAGS.output).expanduser(), "--output")
    if FLAGS.workdir:
        model = inference.load_model_for(FLAGS.config, FLAGS.workdir)
    else:
        model = inference.load_pretrained()
        logging.info("No --workdir: predicting with the packaged model (docs/model_card.md)")
    settings = _predict_settings(model)
    ignored = [
        k for k in config_flags.get_override_values(FLAGS["config"]) if not k.startswith("predict.")
    ]
    if ignored:
        logging.warning(
            "--config.%s: not used by predict (the model's own training settings are)",
            ", --config.".join(ignored),
        )
    for member in model.members if isinstance(model, inference.Ensemble) else [model]:
        member.tta = settings.tta
    spacing = volume_files.Spacing(settings.pixel_spacing_mm, settings.slice_thickness_mm)
    logging.info("Model: %s", model)
    try:
        result = predict_files.predict_path(
            model,
            FLAGS.input,
            FLAGS.output,
            threshold=settings.threshold,
            largest_connected_component=settings.largest_component,
            min_component_voxels=settings.min_component_voxels,
            spacing=spacing,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: {FLAGS.output} holds part of the predictions and no volumes.csv; "
            "the same command predicts them all again",
            file=sys.stderr,
        )
        return 130
    logging.info("%s", result.summary(FLAGS.output))
    for message in result.failures:
        print(f"error: {message}", file=sys.stderr)
    if result.failures:
        print(
            f"{len(result.failures)} problem(s) above; {result.masks_written} of "
            f"{result.images} images were predicted and written",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if not sys.stderr.isatty():  # a log file or a pipe: no progress-bar escape codes
        from tensorflow_datasets.core.utils import tqdm_utils

        tqdm_utils.display_progress_bar(False)
    try:
        if FLAGS.mode == "train" and not _CONFIG_GIVEN:
            raise ConfigError(
                "--mode=train needs --config=FILE or a packaged config name (unet, cpu, demo, "
                "gpu), e.g. --config=demo"
            )
        if FLAGS["workdir"].present and not FLAGS.workdir.strip():
            raise ConfigError("--workdir is empty: name the run's folder (e.g. --workdir=runs/x)")
        if FLAGS.mode != "predict" and not FLAGS.workdir:
            raise ConfigError(
                f"--mode={FLAGS.mode} needs --workdir=DIR, the run's folder (e.g. --workdir=runs/x)"
            )
        for name in ("workdir", "input", "output"):
            value = FLAGS[name].value
            if value and walk.shown(value) != value:  # a newline would split the messages
                raise ConfigError(
                    f"--{name}={walk.shown(value)}: the path holds a control character; rename it"
                )
        if _CONFIG_GIVEN:
            logging.info("Config: %s", config_flags.get_config_filename(FLAGS["config"]))
        # Both before anything starts JAX (the check counts devices).
        parallel.use_host_devices(FLAGS.config)
        parallel.initialize(FLAGS.config)
        configuration.check(FLAGS.config)  # in every mode, before any work
        if not parallel.is_main_process():
            logging.set_verbosity(logging.WARNING)
        if FLAGS.mode != "train" and jax.process_count() > 1:
            raise ConfigError(
                f"--mode={FLAGS.mode} runs in one process; start it without "
                "the distributed settings"
            )
        cv = FLAGS.config.data.cv_folds > 1
        if FLAGS.mode == "train" and cv:
            cross_validation.run(FLAGS.config, FLAGS.workdir)
        elif FLAGS.mode == "train":
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        elif FLAGS.mode == "evaluate" and workdirs.is_cv_workdir(FLAGS.workdir):
            cross_validation.evaluate(FLAGS.config, FLAGS.workdir)
        elif FLAGS.mode == "evaluate":
            report.evaluate_run(FLAGS.config, FLAGS.workdir)
        else:
            sys.exit(_predict())
    except (LggUnetError, OSError) as e:
        if FLAGS.verbose or (isinstance(e, OSError) and not e.filename):
            raise  # --verbose, or an OSError that names no file: the traceback says more
        if isinstance(e, OSError):  # a full disk, a read-only folder, a path that is a file
            e = f"{walk.shown(e.filename)}: {e.strerror or e}"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # checkpoint saved; rerunning the same command continues
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def packaged_config(value: str) -> str:
    """`--config`'s value, with a packaged config's name (`cpu`) or `configs/<name>.py` when
    no such file is in the current folder turned into the path of `lggunet.configs.<name>`."""
    path, sep, arg = value.partition(":")
    name = Path(path).stem
    packaged = Path(lggunet.configs.__file__).parent / f"{name}.py"
    is_name = path == name
    is_repo_path = Path(path).parts == ("configs", f"{name}.py") and not os.path.exists(path)
    if packaged.is_file() and name != "__init__" and (is_name or is_repo_path):
        return f"{packaged}{sep}{arg}"
    return value


def _check_config_file(value: str) -> None:
    """One line and exit 2 when `--config` names neither a file nor a packaged config."""
    path = value.partition(":")[0]
    if os.path.isfile(path) and not path.endswith(".py"):
        print(
            f"error: --config={value}: not a Python config file (a .py file with get_config(), "
            "like configs/unet.py)",
            file=sys.stderr,
        )
        sys.exit(2)
    if not os.path.isfile(path):
        names = sorted(
            p.stem for p in Path(lggunet.configs.__file__).parent.glob("*.py") if p.stem[0] != "_"
        )
        print(
            f"error: --config={value}: no such config file, nor a packaged config "
            f"({', '.join(names)})",
            file=sys.stderr,
        )
        sys.exit(2)


def _with_packaged_configs(argv: list[str]) -> list[str]:
    """argv with packaged config names resolved; without --config, lggunet.configs.unet (its
    defaults for --config.x overrides; predict and evaluate take the run's own settings)."""
    global _CONFIG_GIVEN
    out = list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in out[1:]):
        _CONFIG_GIVEN = False
        out.insert(1, "--config=" + packaged_config("unet"))
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + packaged_config(arg[len("--config=") :])
            _check_config_file(out[i][len("--config=") :])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = packaged_config(out[i + 1])
            _check_config_file(out[i + 1])
    return out


def _usage_error(message: str) -> None:
    print(f"error: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(2)


def _help() -> str:
    """The usage and this command's own flags (absl's --help shows neither for a console
    script), without absl's "(default: 'None')" lines."""
    text = FLAGS.module_help(sys.modules[__name__])
    lines = [x for x in text.splitlines() if x.strip() != "(default: 'None')"]
    return (__doc__ or "").strip() + "\n\nflags:\n" + "\n".join(lines[1:]) + "\n"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a one-line error (exit 2) for a misspelt or ill-typed flag or
    config field, or a stray argument, instead of a usage dump or a traceback."""
    if any(a in ("-h", "-?", "--help", "--helpshort") for a in argv[1:]):
        print(_help(), end="")
        sys.exit(0)
    try:
        rest = FLAGS(_with_packaged_configs(argv))
    except flags.Error as e:  # a value of the wrong type, an unknown flag
        message = " ".join(str(e).split())
        unknown = re.fullmatch(r"Unknown command line flag '(config\..+)'", message)
        _usage_error(f"--{unknown[1]}: the config has no such field" if unknown else message)
    except (AttributeError, KeyError) as e:  # an override naming no field of the config
        text = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'").splitlines()
        key = text[0].strip("'\" ") if text else ""
        paths = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
        named = [x for x in paths if x.split(".")[-1] == key or f".{key}." in f"{x}."]
        hint = " ".join(x.strip() for x in text[1:])
        _usage_error(
            f"--{named[0] if named else 'config.' + key}: the config has no such field"
            + (f". {hint}" if hint else "")
        )
    if len(rest) > 1:
        _usage_error(f"unexpected argument(s) {' '.join(rest[1:])!r}: flags are --name=value")
    return rest


def run() -> None:
    """The `lggunet` console script (and run.py)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
