"""Train a U-Net on the LGG MRI Segmentation data.

python run.py --config=configs/unet.py --config.data.manual_dir=PATH --workdir=runs/unet
python run.py --config=configs/demo.py --workdir=runs/demo     # synthetic phantom, no download
"""

from __future__ import annotations

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lggunet import parallel, train
from lggunet.errors import LggUnetError
from lggunet.interrupts import Interrupted

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/unet.py; override fields with --config.x=y.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and reports go.")
flags.DEFINE_enum(
    "mode", "train", ["train"], "What to do: train (then evaluate the best checkpoint)."
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Hides INFO chatter of orbax (a dozen lines per checkpoint); warnings still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        parallel.initialize(FLAGS.config)
        if not parallel.is_main_process():
            logging.set_verbosity(logging.WARNING)
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except LggUnetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # checkpoint saved; rerunning the same command continues
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main)
