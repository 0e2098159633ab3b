"""The model inside the package: the `configs/cpu.py` recipe shipped in session 26 (tumour
slices x3, 12 epochs) trained on the 49 shared patients of the Kaggle LGG set
(docs/model_card.md). No training, no network:

    model = lggunet.load_model("pretrained")
    python run.py --mode=predict --input=PATIENT_DIR --output=OUT

Its weights are one msgpack file (float32) beside a JSON file holding the run's config, the
checkpoint's record and the weights' SHA-256, checked at every load. `python -m
lggunet.export_model WORKDIR` writes both from the checkpoint a finished run chose
(`evaluate.checkpoint`; the last for `configs/cpu.py`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from lggunet import configuration, models
from lggunet.errors import ConfigError

NAME = "pretrained"  # load_model's name for it
DIRECTORY = Path(__file__).parent / "weights"
WEIGHTS = "lgg49_cpu.msgpack"
RECORD = "lgg49_cpu.json"


def read_record(directory: Path = DIRECTORY) -> dict:
    """The JSON beside the weights: `config`, `checkpoint` (step, epoch, val_loss), `sha256`,
    `training_data`."""
    path = directory / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: the packaged model's record cannot be read ({e}); reinstall lggunet"
        ) from e


def read(directory: Path = DIRECTORY) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(its config, its variables {"params", "batch_stats"}, its record); a ConfigError when
    a file is missing or its SHA-256 differs from the record's."""
    record = read_record(directory)
    config = configuration.upgrade(ml_collections.ConfigDict(record["config"]))
    path = directory / WEIGHTS
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: the packaged weights cannot be read ({e})") from e
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ConfigError(
            f"{path}: the packaged weights are damaged (SHA-256 differs from {RECORD}); "
            "reinstall lggunet"
        )
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.abstract_variables(config))
    variables = serialization.from_bytes(target, data)
    return config, jax.tree.map(jnp.asarray, variables), {**record["checkpoint"], "name": NAME}


def write(
    config: ml_collections.ConfigDict,
    variables: dict,
    checkpoint: dict,
    directory: Path = DIRECTORY,
    training_data: str = "",
) -> Path:
    """Writes weights (float32 msgpack) and record, each atomically (`export_model`)."""
    from lggunet import files

    config = ml_collections.ConfigDict(config.to_dict())
    for field in ("manual_dir", "data_dir"):  # this machine's paths say nothing to a user
        config.data[field] = ""
    config.compilation_cache_dir = ""
    variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
    data = serialization.to_bytes(variables)
    directory.mkdir(parents=True, exist_ok=True)
    files.write_atomic(directory / WEIGHTS, data)
    record = {
        "config": config.to_dict(),
        "checkpoint": checkpoint,
        "sha256": hashlib.sha256(data).hexdigest(),
        "training_data": training_data,
    }
    files.write_atomic(directory / RECORD, json.dumps(record, indent=1, default=str) + "\n")
    return directory / WEIGHTS
