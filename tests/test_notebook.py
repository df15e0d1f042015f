"""The Colab notebook runs top to bottom on CPU (its quick demo), with its figures and tables."""
import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "kif_jax_colab_tpu.ipynb"


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KIF_NOTEBOOK_QUICK", "1")  # two synthetic tasks, one epoch
    monkeypatch.setenv("KIF_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "error" not in [o.output_type for o in outputs]
    assert "0.5/0.5 where both masks are off: True" in text
    assert "seq_lora" in text and "recurrent_kif" in text and "BWT" in text  # the OP / BWT table
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # two accuracy-matrix heatmaps and the loss / mask-share figure
    for method in ("seq_lora", "recurrent_kif"):
        assert (tmp_path / "demo_quick" / method / "accuracy_matrix.png").exists()
