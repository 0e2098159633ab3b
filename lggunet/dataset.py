"""Locate the data (folder, zip, Kaggle download or synthetic phantom) and prepare it with tfds."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from lggunet import files, kaggle3m, parallel, phantom
from lggunet.datasets.lgg_mri_segmentation import LggMriSegmentation, make_config
from lggunet.errors import ConfigError, DataError

KAGGLE_HANDLE = "mateuszbuda/lgg-mri-segmentation"
CHECKSUMS_FILE = "lggunet_checksums.json"  # digests of the prepared files, beside them


def data_dir(data_config: ml_collections.ConfigDict) -> Path:
    """Prepared data sets: `data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets;
    a ConfigError naming the setting when it cannot be a folder."""
    setting = (
        "data.data_dir"
        if data_config.get("data_dir")
        else "$TFDS_DATA_DIR"
        if os.environ.get("TFDS_DATA_DIR")
        else "the default data_dir"
    )
    path = data_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(
                f"{path}: {setting} cannot be a folder ({p} is a file); point it at a folder"
            )
        if p.exists():
            break
    return path


def default_manual_dir(data_config: ml_collections.ConfigDict) -> Path:
    """tfds's conventional place for a manual download of this data set."""
    return data_dir(data_config) / "downloads" / "manual" / "lgg_mri_segmentation"


def _download(target: Path) -> Path:
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(KAGGLE_HANDLE))
    except Exception as e:  # no network, no credentials, Kaggle refusing: all end the same way
        raise DataError(
            f"could not download {KAGGLE_HANDLE} with kagglehub ({type(e).__name__}: "
            f"{' '.join(str(e).split())}): download it by hand and put the zip or the "
            f"extracted folder in {target}, or pass --config.data.manual_dir=PATH"
        ) from e


def locate_source(data_config: ml_collections.ConfigDict) -> Path:
    """The folder or zip to read: manual_dir, else the phantom, else the default place, else
    a kagglehub download when `data.download` is set; otherwise a DataError saying what to do."""
    if data_config.manual_dir:
        return Path(data_config.manual_dir).expanduser()
    if data_config.phantom:
        root = (
            data_dir(data_config)
            / "lgg_phantom"
            / (
                f"{data_config.phantom_patients}x{data_config.phantom_slices}"
                f"-seed{data_config.phantom_seed}"
            )
        )
        logging.info("No manual_dir given: using the synthetic phantom data set in %s", root)
        return phantom.write_phantom(
            root,
            num_patients=data_config.phantom_patients,
            slices_per_patient=data_config.phantom_slices,
            seed=data_config.phantom_seed,
        )
    default = default_manual_dir(data_config)
    if default.exists() and any(default.iterdir()):
        return default
    if data_config.download:
        return _download(default)
    raise DataError(
        "no LGG data found: --config.data.manual_dir is empty and nothing is in the default "
        f"place {default}; put the Kaggle zip (lgg-mri-segmentation.zip) or the extracted "
        f"folder holding kaggle_3m/ there, or {kaggle3m.HOW_TO_GET_DATA}"
    )


def prepare(data_config: ml_collections.ConfigDict) -> LggMriSegmentation:
    """Builds (once per source, split and seed) and returns the prepared tfds builder.

    In a multi-process run process 0 prepares first while the others wait, then they open
    what it wrote (a shared data_dir) or prepare their own copy (a host-local one).
    """
    if jax.process_count() == 1:
        return _prepare(data_config)
    failure: Exception | None = None
    if parallel.is_main_process():
        try:
            builder = _prepare(data_config)
        except Exception as e:  # tell the others before raising, or they would wait forever
            failure = e
    parallel.barrier("lggunet-prepare")
    if parallel.any_process(failure is not None):
        if failure is not None:
            raise failure
        raise DataError("process 0 could not prepare the data set (its log says why)")
    if not parallel.is_main_process():
        builder = _prepare(data_config)
    return builder


def _prepare(data_config: ml_collections.ConfigDict) -> LggMriSegmentation:
    if data_config.cv_folds and data_config.cv_fold < 0:
        raise ConfigError(
            f"data.cv_folds={data_config.cv_folds} with data.cv_fold=-1 (every fold) names no "
            "single split: train with run.py or lggunet.cross_validation.run, or set cv_fold"
        )
    source_path = locate_source(data_config)
    source = kaggle3m.open_source(source_path)
    config = make_config(
        fingerprint=source.fingerprint(),
        source=str(source_path),
        split_mode=data_config.split_mode,
        split_seed=data_config.split_seed,
        split_fractions=tuple(data_config.split_fractions),
        skip_invalid=bool(data_config.skip_invalid),
        cv_folds=int(data_config.cv_folds),
        cv_fold=int(data_config.cv_fold) if data_config.cv_folds else 0,
    )
    builder = LggMriSegmentation(
        config=config, data_dir=str(data_dir(data_config)), file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(source_path if source_path.is_dir() else source_path.parent)
        )
    )
    skipped = builder.info.metadata.get("skipped") or []
    if skipped:
        logging.warning(
            "data.skip_invalid: %d problem(s); the slices they name were left out of %s:\n  %s",
            len(skipped),
            builder.data_path,
            "\n  ".join(skipped),
        )
    recorded = builder.info.metadata.get("fingerprint")
    if recorded != config.fingerprint:  # never serve a copy made from other data
        raise DataError(
            f"{builder.data_path}: prepared from a source with fingerprint {recorded}, "
            f"not {config.fingerprint} ({source.location}); delete that folder and rerun"
        )
    verify_prepared(Path(str(builder.data_path)))
    return builder


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            with path.open("rb") as f:
                out[path.name] = hashlib.file_digest(f, "blake2b").hexdigest()
    return out


def verify_prepared(folder: Path) -> None:
    """Checks the prepared files against the digests taken when they were made (taken now on
    the first use); a changed or missing file is a DataError naming it, with the fix."""
    path = folder / CHECKSUMS_FILE
    now = _digests(folder)
    if not path.exists():
        if parallel.is_main_process():
            files.write_atomic(path, json.dumps(now, indent=1) + "\n")
        return
    try:
        before = json.loads(path.read_text())
        if not isinstance(before, dict):
            raise ValueError(f"a JSON {type(before).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable ({e}); delete {folder} and rerun to prepare it again"
        ) from e
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            what = "is missing" if name not in now else "has changed since it was prepared"
            raise DataError(
                f"{folder / name}: the prepared copy is damaged ({what}); delete {folder} "
                "and rerun to prepare it again from the source"
            )
