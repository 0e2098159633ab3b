"""What the bench scripts share: a synthetic device batch for the train step, and printing (and
optionally appending to BENCHMARKS.md) a Markdown table. Imported as `common` by scripts run as
`python bench/<name>.py` (their folder is first on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch with the train step's fields: random uint8 images, ~3% tumour pixels."""
    data = np.random.default_rng(seed)
    return {
        "image": data.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "mask": (data.random((batch, size, size, 1)) > 0.97).astype(np.uint8),
        "valid": np.ones(batch, bool),
        "volume_mean": np.zeros((batch, 3), np.float32),
        "volume_std": np.ones((batch, 3), np.float32),
    }


def emit(lines: list[str], write: bool) -> None:
    """Prints the table; with `write`, appends it to BENCHMARKS.md."""
    table = "\n".join(lines) + "\n"
    print(table)
    if write:
        with (REPO / "BENCHMARKS.md").open("a") as f:
            f.write("\n" + table)
