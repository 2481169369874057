"""The quickstart notebook runs headless (nbclient) on the tiny model, so it never rots; the committed
notebooks carry the outputs of a real SmolLM2-135M run."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "examples" / "notebooks"

pytestmark = pytest.mark.slow


def text_outputs(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def test_quickstart_notebook_runs_on_the_tiny_model(monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PEFT_PAT_NOTEBOOK_TINY", "1")  # the kernel inherits the environment
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and the traceback, if any cell fails
    out = text_outputs(notebook)
    assert "model: tiny-random-llama" in out
    assert "identical to the base model right after wrapping: True" in out
    assert "kept width N = 56 of 64 hidden channels" in out  # the default axes: hidden -12.5% + MLP
    assert "stock reload gives the same logits: True" in out
    assert "parameters: 80,704 -> 59,864" in out
    assert images(notebook) == 1  # the mask's evolution


@pytest.mark.parametrize("name", ["quickstart.ipynb", "pruning_walkthrough.ipynb"])
def test_committed_notebooks_hold_a_real_smollm2_run(name):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: execute every cell before committing"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    out = text_outputs(notebook)
    assert "hidden_size=576" in out and "tiny-random-llama" not in out
    assert images(notebook) >= (1 if name == "quickstart.ipynb" else 3)
