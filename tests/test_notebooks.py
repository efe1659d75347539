"""The example notebooks (examples/notebooks/) run top to bottom on a real kernel from this venv
(nbclient + ipykernel): each starts the embedded broker, a local Ray and the tiny vLLM model, runs
a job through `import tidegate` and reads it back. A cell that raises fails the test. The charts
must come out as images, and the notebooks are committed with their outputs cleared."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))
CHARTS = {"02-guardrails": 1, "04-operations": 1}  # notebook -> images it must show


def test_the_four_notebooks_are_there_with_outputs_cleared():
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == ["01-quickstart", "02-guardrails", "03-encryption", "04-operations"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: outputs committed in cells {dirty} (clear them)"


def _outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean(path: Path, tiny_model, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: its tables and Ray's files under this test's temp dirs.
    monkeypatch.setenv("TIDEGATE_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("TIDEGATE_TINY_MODEL", str(tiny_model))
    monkeypatch.setenv("TIDEGATE_RAY_TEMP_DIR", tempfile.mkdtemp(prefix="tgray", dir="/tmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TIDEGATE_MASTER_KEY", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails

    text, images = _outputs(nb)
    assert images >= CHARTS.get(path.stem, 0), f"{path.stem}: {images} chart image(s)"
    assert "Traceback" not in text
    expected = {
        "01-quickstart": "finished",  # the run handle's repr
        "02-guardrails": "grounding",
        "03-encryption": "refused: ",  # the tenant-only keyring on acme's rows
        "04-operations": "initech",
    }[path.stem]
    assert expected in text, text[-3000:]
    assert any((tmp_path / path.stem / "results").glob("_delta_log/*.json"))  # it wrote where told
