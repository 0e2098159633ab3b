"""Shared fixtures: the real LGG subset (when present), synthetic kaggle_3m trees, configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so `configs` imports as it does for run.py

# The tests train, resume and evaluate tiny models many times over, compiling the same steps
# again each time: jax's persistent compilation cache keeps each compiled step (those that
# take over half a second to compile) and reads it back after. One folder per xdist worker,
# shared with the run.py subprocesses it starts (they inherit the environment; a file lock,
# hence the filelock package, keeps their writes whole): workers sharing one lock waited on
# each other. A clean clone starts empty; an entry is keyed by the program, its compile
# options and the jax and XLA versions.
_XLA_CACHE = REPO / ".pytest_cache" / "xla" / os.environ.get("PYTEST_XDIST_WORKER", "main")
if os.environ.get("LGG_TEST_XLA_CACHE") or "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["LGG_TEST_XLA_CACHE"] = "1"  # ours, not the user's: each worker sets its own
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(1 << 30))
# JAX started here, with its one CPU device, whichever config a test trains first in this
# process (`host_devices` of configs/cpu.py would otherwise split the CPU if it came first).
# Subprocesses choose their own count (XLA_FLAGS or host_devices).
jax.devices()

REAL_DATA_ENV = "LGG_DATA_DIR"
_DEFAULT_REAL = REPO.parent / "shared" / "data" / "lgg" / "kaggle_3m"


def real_data_path() -> Path | None:
    path = Path(os.environ.get(REAL_DATA_ENV, _DEFAULT_REAL)).expanduser()
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real subset (29 patients, 909 slices); skips where it is absent."""
    path = real_data_path()
    if path is None and os.environ.get("LGG_REQUIRE_REAL_DATA"):
        pytest.fail(
            f"LGG_REQUIRE_REAL_DATA is set but no data at {REAL_DATA_ENV} / {_DEFAULT_REAL}"
        )
    if path is None:
        pytest.skip(
            f"real LGG data not found: set {REAL_DATA_ENV} to a kaggle_3m folder "
            f"(looked in {_DEFAULT_REAL})"
        )
    return path


@pytest.fixture(scope="session")
def real_tfds_dir(tmp_path_factory) -> Path:
    """One data_dir per test session, so the real data set is prepared only once."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def real_builder(real_data, real_tfds_dir):
    from lggunet import dataset
    from lggunet.configs import unet

    config = unet.get_config()
    config.data.manual_dir = str(real_data)
    config.data.data_dir = str(real_tfds_dir)
    return dataset.prepare(config.data)


def write_case(root: Path, case: str, num_slices: int, seed: int = 0, start: int = 1) -> None:
    """Writes one patient folder of random kaggle_3m-style TIFFs under root."""
    rng = np.random.default_rng(seed)
    folder = root / case
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(start, start + num_slices):
        image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        mask = np.zeros((256, 256), np.uint8)
        if n % 2:
            y, x = rng.integers(20, 200, 2)
            mask[y : y + 30, x : x + 20] = 255
        tifffile.imwrite(folder / f"{case}_{n}.tif", image, photometric="rgb")
        tifffile.imwrite(folder / f"{case}_{n}_mask.tif", mask)


@pytest.fixture
def synthetic_kaggle_3m(tmp_path) -> Path:
    """A tiny kaggle_3m/ with 5 patients from 3 institutions, 3 slices each."""
    root = tmp_path / "src" / "kaggle_3m"
    cases = [
        "TCGA_AA_0001_20000101",
        "TCGA_AA_0002_20000102",
        "TCGA_BB_0003_20000103",
        "TCGA_BB_0004_20000104",
        "TCGA_CC_0005_20000105",
    ]
    for i, case in enumerate(cases):
        write_case(root, case, 3, seed=i)
    (root / "data.csv").write_text("Patient\n" + "\n".join(c[:12] for c in cases) + "\n")
    return root


@pytest.fixture
def tiny_config(tmp_path):
    """configs/demo.py shrunk to seconds: 32x32 inputs, width 4, depth 2, one epoch."""
    from tests.helpers.tiny import tiny_config as shrunk

    config = shrunk(tmp_path / "tfds")
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 1
    config.log_every_steps = 5
    return config
