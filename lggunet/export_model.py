"""Writes a finished run's chosen checkpoint as the packaged model (`lggunet.pretrained`):

python -m lggunet.export_model WORKDIR --training-data="49 patients of ..."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lggunet import inference, pretrained
from lggunet.errors import ConfigError, LggUnetError


def export(workdir: str | Path, directory: Path, training_data: str = "") -> Path:
    """The run's chosen checkpoint (its `evaluate.checkpoint`: the best by validation loss, or
    the last) of one run, not a cross-validation workdir, into `directory`."""
    model = inference.load_model(workdir, tta=False)
    if not isinstance(model, inference.Model):
        raise ConfigError(f"{workdir}: a cross-validation workdir; export one run's folder")
    checkpoint = {
        "step": model.record.get("checkpoint_step"),
        "epoch": model.record.get("epoch"),
        "val_loss": model.record.get("val_loss"),
    }
    return pretrained.write(model.config, model.variables, checkpoint, directory, training_data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--out", type=Path, required=True, help="e.g. lggunet/weights")
    parser.add_argument("--training-data", default="", help="what the run trained on")
    args = parser.parse_args(argv)
    try:
        path = export(args.workdir, args.out, args.training_data)
    except (LggUnetError, OSError) as e:
        where = f"{e.filename}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        print(f"error: {where}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {args.out / pretrained.RECORD}")


if __name__ == "__main__":
    main()
