"""Every notebook runs top to bottom (small size switch on); a failing cell fails the test."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("SPD_LENS_SMALL", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Figures render: plotly outputs carry their JSON for Jupyter.
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)


def test_the_five_notebooks_are_there_with_their_outputs_stored():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_which_heads_carry_the_capability", "02_rank_by_layer_ablation", "03_api_tour",
                     "04_your_own_capability", "05_ablate_your_capability"]
    for path in NOTEBOOKS:  # committed executed: a repository page shows the outputs and figures as images
        outputs = [o for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
                   for o in cell.get("outputs", [])]
        figures = [o["data"] for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        assert figures and all("image/png" in data for data in figures), path.name
        assert not [o for o in outputs if o.get("output_type") == "error"], path.name
        assert path.stat().st_size < 1_500_000, path.name  # small enough for git
