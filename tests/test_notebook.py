"""docs/quickstart.ipynb runs top to bottom (nbclient), so it cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
    monkeypatch.setenv("LGGUNET_QUICKSTART_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    real = REPO.parent / "shared" / "data" / "lgg" / "kaggle_3m" / "TCGA_CS_4941_19960909"
    monkeypatch.setenv("LGG_PATIENT", str(real))
    notebook = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = "\n".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "per-volume Dice" in outputs
    images = [
        out for cell in notebook.cells for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]  # fmt: skip
    assert images, "the overlay figure was not drawn"
    if real.is_dir():  # the pretrained model on one of its training patients: a sanity check
        line = next(x for x in outputs.splitlines() if x.startswith("TCGA_CS_4941"))
        assert float(line.split("Dice ")[1].split()[0]) > 0.5, line
    assert os.path.isdir(tmp_path / "work" / "run" / "checkpoints")
