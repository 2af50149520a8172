"""notebooks/throughput.ipynb runs headless on a tiny config and saves every figure; it is kept
without outputs."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "throughput.ipynb"
FIGURES = ("tokens_per_s.png", "latency_cdf.png", "spread_ratio.png", "slot_occupancy.png")


def inject_parameters(nb, params: dict) -> None:
    """As papermill does: a cell assigning ``params`` right after the cell tagged ``parameters``."""
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def execute(params: dict, cwd: Path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, params)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    return nb


def tiny_params(tmp_path: Path, **overrides) -> dict:
    return {
        "SHAPE": "tiny-t5", "NUM_REQUESTS": 6, "NUM_SLOTS": 2,
        "SYSTEMS": ["encdec-inflight", "encdec-static", "hf-generate"],
        "INPUT_LEN": (2, 12), "OUTPUT_LEN": (1, 12), "SPREADS": [0.0, 0.5, 1.0],
        "ENGINE_OPTIONS": {"max_encoder_batch": 2},  # few encoder variants to compile
        "OUT_DIR": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "shapes"), **overrides,
    }


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_stored_without_outputs_and_has_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert ["parameters" in c.metadata.get("tags", []) for c in code].count(True) == 1
    assert "RESULTS = None" in code[0].source and "OUT_DIR" in code[0].source


def test_notebook_runs_a_tiny_benchmark_and_saves_every_figure(tmp_path):
    nb = execute(tiny_params(tmp_path), tmp_path)
    out = tmp_path / "out"
    for name in FIGURES:
        assert (out / name).stat().st_size > 10_000, name
    assert _images(nb) == len(FIGURES)
    assert (out / "benchmark" / "results.json").exists() and (out / "spread" / "results.json").exists()
    text = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells for o in c.get("outputs", []))
    for system in ("encdec-inflight", "encdec-static", "hf-generate"):
        assert f"| {system} |" in text  # the benchmark table
    assert text.count("| spread-") == 3  # the spread table, one row per spread

    # Loading a results.json instead of running: the same figures, from the saved runs.
    again = tmp_path / "again"
    execute(tiny_params(tmp_path, RESULTS=str(out / "benchmark" / "results.json"),
                        OUT_DIR=str(again), SPREADS=[0.0, 1.0]), tmp_path)
    assert not (again / "benchmark").exists()
    for name in FIGURES:
        assert (again / name).stat().st_size > 10_000, name
