"""Issue 13, item 5: docs/notebooks/quickstart.ipynb runs end to end in a Jupyter kernel (nbclient), on a small
CIFAR-like folder made here, so that it never goes stale."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT, write_class_folder

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
if importlib.util.find_spec("ipykernel") is None:  # found, not imported: this process is no kernel
    pytest.skip("ipykernel is absent", allow_module_level=True)

NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_the_notebook_is_stored_without_outputs():
    """Outputs are made by running it; stored ones would go stale (and bloat every diff)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
    write_class_folder(tmp_path / "cifar" / "train", CLASSES, 4, size=32, seed=1, fmt="jpg")
    write_class_folder(tmp_path / "cifar" / "test", CLASSES, 2, size=32, seed=2, fmt="jpg")
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path / "cifar"))
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # a cell that raises fails the test with the cell and its traceback
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 4  # the data, the curves, the mistakes, a picture
    train_cell = next(cell for cell in nb.cells if "imgclf.fit(" in cell.source)
    shown = "".join(out.get("text", "") for out in train_cell.outputs)
    widgets = [out for out in train_cell.outputs if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert widgets or "%|" in shown, shown  # a progress bar rendered in the notebook, not the plain step lines
    assert "step 1/" not in shown and "epoch 1: test accuracy" in shown
    assert (work / "runs" / "quickstart" / "checkpoints" / "best.onnx").is_file()
    last = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert "best.onnx ->" in last and "eval mode: True" in last
