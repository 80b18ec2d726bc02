"""The teaching notebooks run top to bottom on the bundled model; each checks its own claims with
asserts (shapes, parameter counts, sampler convergence, DreamBooth learning the subject)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_collected():
    assert {p.name for p in NOTEBOOKS} == {"unet_anatomy.ipynb", "samplers.ipynb", "dreambooth.ipynb", "attention.ipynb",
                                           "conditioning_ablation.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_asserts_hold(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout, whatever is installed
    # Run in a scratch folder: whatever a notebook writes stays out of the repository.
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
