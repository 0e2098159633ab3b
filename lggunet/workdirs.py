"""What a training workdir holds, and who may write it.

- `locked(workdir)`: one training per workdir at a time (an advisory lock on `WORKDIR/.lock`);
  a second one stops at once, naming the holder.
- `check_resumable(config, workdir)`: before anything is written, a rerun into a workdir that
  holds checkpoints must ask for the same run; only the fields in `FREE_FIELDS` (more epochs,
  other data paths, logging, evaluation and prediction settings) may change.
- `splits.json`: the data fingerprint and every split's patients, recorded when training
  starts, so that evaluation and prediction on other data never call a training patient
  "test": patients the run never saw are "unseen".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import ml_collections

from lggunet import configuration, files
from lggunet.errors import ConfigError, LggUnetError

LOCK_FILE = ".lock"
SPLITS_FILE = "splits.json"
FINAL_METRICS_FILE = "final_metrics.json"  # written when a run has finished
FOLD_DONE_FILE = "fold_done.json"  # written when a fold has been trained and scored
UNSEEN = "unseen"
# Fields a resumed run may change: none of them alters what was trained so far.
FREE_FIELDS = (
    "num_epochs",
    "log_every_steps",
    "summary_images",
    "summary_every_epochs",
    "compilation_cache_dir",
    "profile.",
    "config_version",
    "eval_batch_size",
    "host_devices",  # the same training up to summation order
    "early_stopping.",
    "distributed.",
    "data.manual_dir",
    "data.data_dir",
    "data.download",
    "data.num_threads",
    "data.num_workers",
    "data.device_cache",
    "evaluate.",
    "predict.",
)


class WorkdirBusy(LggUnetError):
    """Another process is training in this workdir."""


def make_writable_dir(path: Path, what: str) -> None:
    """Creates `path` if needed; ConfigError naming it when it is a file, not writable, or
    inside a run's `checkpoints/` (orbax's folder, which would then hold a stranger)."""
    for p in (path.absolute(), *path.absolute().parents):
        if p.name == "checkpoints" and (p.parent / "config.json").exists():
            raise ConfigError(
                f"{path}: {what} is inside the checkpoints of the run in {p.parent}; "
                "use a folder of its own"
            )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create {what} ({e.strerror or e})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: {what} is not writable")


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Holds `WORKDIR/.lock` while the body runs; raises WorkdirBusy when another process
    holds it. The lock goes with the process, so a killed run never leaves it stuck."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise WorkdirBusy(
                f"{workdir}: another training run is using this workdir ({holder}); wait for "
                "it to finish or use another --workdir"
            ) from e
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> new' for every field outside FREE_FIELDS that differs. A field the
    saved config lacks (an older lggunet) counts as the value such runs used
    (`configuration.ADDED`); other fields it lacks are not compared."""
    before, now = _flat(saved), _flat(_as_json(config))
    for field, (_, value) in configuration.ADDED.items():
        before.setdefault(field, value)
    free = FREE_FIELDS
    if now.get("lr_schedule") == "cosine":  # the cosine schedule's length is num_epochs
        free = tuple(f for f in FREE_FIELDS if f != "num_epochs")
    return [
        f"{key}: {before[key]!r} -> {value!r}"
        for key, value in sorted(now.items())
        if key in before
        and before[key] != value
        and not any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)
    ]


def has_checkpoints(workdir: Path) -> bool:
    """True when `workdir` (or any fold of a cross-validation in it) holds a checkpoint."""
    dirs = [workdir / "checkpoints", *workdir.glob("fold_*/checkpoints")]
    return any(d.is_dir() and any(d.iterdir()) for d in dirs)


def check_resumable(config: ml_collections.ConfigDict, workdir: Path, config_file: str) -> None:
    """Raises ConfigError, before anything is written, when `workdir` holds checkpoints of a
    run whose saved config differs from `config` outside FREE_FIELDS."""
    path = workdir / config_file
    if not has_checkpoints(workdir):
        return
    if not path.exists():
        raise ConfigError(
            f"{workdir} holds checkpoints but no {config_file} (deleted, or a run from before "
            "lggunet saved it), so this run cannot be checked against them: put back the "
            "config.json it was trained with, or use another workdir"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable config ({e}); use another workdir") from e
    differ = config_differences(saved, config)
    if differ:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with other settings ({'; '.join(differ[:3])}"
            f"{more}): rerun with the settings of {path} to resume it, or use another workdir"
        )


def split_record(metadata: dict) -> dict:
    """What `splits.json` holds, from a prepared data set's metadata."""
    record = {
        "fingerprint": metadata["fingerprint"],
        "source": metadata["source"],
        "split_mode": metadata.get("split_mode", "patient"),
        "patients": {k: sorted(v) for k, v in metadata["patients"].items()},
    }
    if record["split_mode"] == "slice":
        record["slices"] = {k: sorted(v) for k, v in metadata.get("slices", {}).items()}
    return record


def recorded_splits(workdir: Path) -> dict | None:
    """The run's `splits.json`, or None for runs made before it was written."""
    path = workdir / SPLITS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        patients = record["patients"]
        if not isinstance(patients, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in patients.values()
        ):
            raise ValueError("'patients' is not a list of patient ids per split")
        for key in ("source", "fingerprint"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"no {key!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path}: unreadable ({e!r}); it says which patients trained this model, so "
            "evaluation cannot tell test from training patients without it"
        ) from e
    return record


def record_or_check_splits(workdir: Path, metadata: dict) -> None:
    """Writes `splits.json` on a first start; on a resume refuses data whose split differs
    from the recorded one (the model would go on training on its validation or test
    patients)."""
    now = split_record(metadata)
    before = recorded_splits(workdir) if has_checkpoints(workdir) else None
    if before is None:  # a first start (or one that crashed before its first checkpoint)
        files.write_atomic(workdir / SPLITS_FILE, json.dumps(now, indent=1) + "\n")
        return
    if before["patients"] != now["patients"] or before.get("slices") != now.get("slices"):
        moved = sorted(
            p
            for split, patients in now["patients"].items()
            for p in set(patients) ^ set(before["patients"].get(split, []))
        )
        raise ConfigError(
            f"{workdir / SPLITS_FILE}: this run was trained on another split of other data "
            f"({before['source']}); with {now['source']} {len(moved)} patient(s) change split "
            f"(e.g. {', '.join(moved[:3])}): resume with the run's data, or use another workdir"
        )


def label_patients(record: dict) -> dict[str, str]:
    """Patient id -> the split it had in the recorded run (patient-level splits)."""
    return {p: split for split, patients in record["patients"].items() for p in patients}


def find_checkpoints(path: str | Path) -> tuple[Path, Path]:
    """(workdir, checkpoints dir) for a run's workdir or its `checkpoints/` folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such directory")
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints"
    if path.name == "checkpoints":
        return path.parent, path
    raise ConfigError(f"{path}: not a training workdir (no checkpoints/ folder in it)")


def cv_folds_of(workdir: str | Path) -> int:
    """The number of folds when `workdir` is a cross-validation run's, else 0."""
    config = configuration.saved_config(workdir)
    return int(config.data.cv_folds) if config is not None else 0


def check_one_run(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """ConfigError unless `config` trains one model into `workdir`: not every fold of a
    cross-validation at once, and not into a cross-validation's folder."""
    if config.data.cv_folds and config.data.cv_fold < 0:
        raise ConfigError(
            "data.cv_fold=-1 means every fold: run them with run.py (or "
            "lggunet.cross_validation.run), or set data.cv_fold to one fold"
        )
    if is_cv_workdir(workdir):
        raise ConfigError(
            f"{workdir} holds a cross-validation run (its folds are fold_<k>/): train it "
            "with the same data.cv_folds, or use another workdir"
        )


def is_cv_workdir(path: str | Path) -> bool:
    """True for the top folder of a cross-validation run (not one of its fold workdirs)."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "checkpoints").is_dir():
        return False
    config = configuration.saved_config(path)
    if config is None:
        return False
    return int(config.data.cv_folds) > 1 and int(config.data.cv_fold) < 0


def finished(workdir: str | Path) -> bool:
    """True once a training run has ended (trained, or stopped early) and written its final
    metrics (or, a fold, been marked done); False while it trains, after it was interrupted,
    and while a finished run is trained further."""
    workdir = Path(workdir)
    return (workdir / FINAL_METRICS_FILE).is_file() or (workdir / FOLD_DONE_FILE).is_file()


def fold_workdir(workdir: str | Path, fold: int) -> Path:
    """Where fold `fold` of a cross-validation run trains."""
    return Path(workdir) / f"fold_{fold}"


def check_fold_trained(workdir: Path, k: int, folds: int) -> Path:
    """Fold `k`'s folder, once trained and scored (its fold_done.json) with its checkpoints;
    else ConfigError saying what to do (an ensemble must not take a half-trained fold)."""
    fold_dir = fold_workdir(workdir, k)
    done = fold_dir / FOLD_DONE_FILE
    again = "finish the cross-validation (rerun its training command) or load one fold's folder"
    if done.is_file() and not has_checkpoints(fold_dir):
        raise ConfigError(
            f"{fold_dir}: fold {k} of {folds} is marked done ({done.name}) but has no "
            f"checkpoints (deleted or moved): put them back, or delete {done} and rerun "
            "the training command to train that fold again"
        )
    if not (fold_dir / "checkpoints").is_dir():
        raise ConfigError(f"{fold_dir}: fold {k} of {folds} has no checkpoints yet; {again}")
    if not done.is_file():
        raise ConfigError(
            f"{fold_dir}: fold {k} of {folds} is not finished (no {FOLD_DONE_FILE}: still "
            f"training, or stopped); {again}"
        )
    return fold_dir
