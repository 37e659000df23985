"""The teaching notebooks (``notebooks/*.ipynb``) run top to bottom, headless, on short runs.

Every notebook is executed with nbclient in a temporary copy, in file order, with
``WPEFT_NB_RUNS`` pointing at one module-wide temporary runs directory (so 02-04 reuse the runs
that 01 trained) and ``WPEFT_NB_STEPS`` small. The kernel is the Python running the tests (a
kernelspec written for the session), so the notebooks import the same wpeft. Besides "no cell
raised", each notebook's outputs are checked for what it is there to show: shapes, tables,
figures, and that every ipywidgets ``interact`` rendered a figure (a plot function that raises
inside ``interact`` does not fail the cell; its traceback lands in the widget's output).

The committed notebooks must carry no outputs (checked without executing anything).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
STEPS = 10  # WPEFT_NB_STEPS for the tests: records at every step (record_every = STEPS // 10)
CELL_TIMEOUT = 600  # seconds per cell
RUN_ROOT = f"steps-{STEPS}"
SHARED_RUNS = ("downscaling/weatherpeft-default-s0", "downscaling/full-default-s0")


def test_notebooks_are_there() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_fisher_masks.ipynb",
        "03_prompt_attention.ipynb",
        "04_skill_maps.ipynb",
        "05_how_it_works.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb["metadata"], "stored widget state: strip it"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [], f"cell {i} of {path.name} has outputs: strip them"
        assert cell["execution_count"] is None, f"cell {i} of {path.name} has an execution count"


# --------------------------------------------------------------------------- execution


@dataclass
class Workspace:
    notebooks: Path  # the copies that are executed
    runs: Path  # WPEFT_NB_RUNS
    summary_mtimes: dict[str, int] = field(default_factory=dict)  # after the first training

    @property
    def root(self) -> Path:
        return self.runs / RUN_ROOT


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("ipywidgets")
    pytest.importorskip("matplotlib")
    base = tmp_path_factory.mktemp("notebooks")
    copies = base / "notebooks"
    copies.mkdir()
    for path in NOTEBOOKS:
        (copies / path.name).write_bytes(path.read_bytes())
    # A kernelspec that starts this very interpreter, first on the search path.
    spec = base / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(base / "jupyter"))
        mp.setenv("WPEFT_NB_RUNS", str(base / "runs"))
        mp.setenv("WPEFT_NB_STEPS", str(STEPS))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Workspace(notebooks=copies, runs=base / "runs")


def _in_slices(get_msg):
    """A channel's ``get_msg`` that polls in one-second slices up to the same timeout.

    jupyter_client's async ``get_msg(timeout)`` waits on the socket's poll, which can miss the
    wake-up of a message that has arrived and then returns it only when the timeout ends
    (jupyter/nbclient#312, seen with ipywidgets cells): one cell then stalls for the whole
    cell timeout and still passes. Short slices bound such a stall to a second.
    """
    from queue import Empty

    async def sliced(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return sliced


def execute(ws: Workspace, stem: str):
    """Run the copy of ``stem`` top to bottom (fails on the first cell that raises)."""
    import nbclient
    import nbformat

    class Client(nbclient.NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                channel.get_msg = _in_slices(channel.get_msg)
            return kc

    path = ws.notebooks / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = Client(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(ws.notebooks)}},
        # The kernel flushes stdout on a timer: on a loaded machine one print can arrive as
        # several stream outputs, which would split the lines the tests look for.
        coalesce_streams=True,
    )
    client.execute()
    return nb


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def text_of(nb) -> str:
    """Everything the cells printed or showed as text."""
    parts = []
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.data.get("text/plain", ""))
                parts.append(out.data.get("text/html", ""))
    return "\n".join(parts)


def images_in_cells(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for c in code_cells(nb) for out in c.get("outputs", [])
    )


#: The mime type of a Panel object shown in a notebook (its Bokeh document).
PANEL_MIME = "application/vnd.holoviews_exec.v0+json"


def panel_outputs(nb) -> list[dict]:
    """The results of the cells that ended in a Panel object (a workbench view; what
    ``pn.extension()`` itself displays is not a result)."""
    return [out for c in code_cells(nb) for out in c.get("outputs", [])
            if out.get("output_type") == "execute_result" and PANEL_MIME in out.get("data", {})]


def widget_outputs(nb) -> list[list[dict]]:
    """The outputs captured by each ipywidgets Output widget (one per ``interact``)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return [
        model["state"].get("outputs", [])
        for model in state.get("state", {}).values()
        if model.get("model_name") == "OutputModel"
    ]


def check_widgets(nb, expected: int) -> None:
    """Each interact call rendered a figure and none raised inside its plot function."""
    calls = sum(c.source.count("widgets.interact(") for c in code_cells(nb))
    assert calls == expected
    outputs = widget_outputs(nb)
    assert len(outputs) == calls
    for captured in outputs:
        errors = [o for o in captured if o.get("output_type") == "error"]
        assert not errors, f"a plot function raised inside interact: {errors[0].get('evalue')}"
        assert any("image/png" in o.get("data", {}) for o in captured), captured


def check_shared_runs_untouched(ws: Workspace) -> None:
    """Runs trained by an earlier notebook were reused, not trained again."""
    for name, mtime in ws.summary_mtimes.items():
        assert (ws.root / name / "summary.json").stat().st_mtime_ns == mtime, name


@pytest.mark.slow
def test_01_quickstart(workspace: Workspace) -> None:
    nb = execute(workspace, "01_quickstart")
    text = text_of(nb)
    assert "E = embedding_kernels(): (64, 12, 2, 4, 4)" in text
    for name in SHARED_RUNS:
        summary = json.loads((workspace.root / name / "summary.json").read_text())
        assert summary["steps"] == STEPS
        workspace.summary_mtimes[name] = (workspace.root / name / "summary.json").stat().st_mtime_ns
    # the comparison table: both methods, the headline RMSE and the bilinear reference
    assert re.search(r"<th>method</th>\s*<th>full</th>\s*<th>weatherpeft</th>", text)
    assert "rmse/2m_temperature" in text and "rmse_bilinear/2m_temperature" in text
    assert images_in_cells(nb) >= 1  # the skill map
    # the figure set, as `wpeft figures` writes it
    figures = workspace.root / "figures"
    written = {p.name for p in figures.glob("*.png")}
    match = re.search(r"(\d+) figures written to", text)
    assert match and int(match.group(1)) == len(written) > 20
    assert {
        "weatherpeft-default-s0-fisher-density.png",
        "weatherpeft-default-s0-fisher-overlap.png",
        "weatherpeft-default-s0-rmse-2m_temperature.png",
        "full-default-s0-rmse-2m_temperature.png",
        "downscaling-weatherpeft-default-s0-vs-full-default-s0-2m_temperature.png",
        "downscaling-budget-vs-skill.png",
    } <= written
    assert all(p.stat().st_size > 1000 for p in figures.glob("*.png"))
    # the dashboard's Curves and Scorecard views, inline (workbench_view raises if a view
    # shows an error instead of its plot)
    assert len(panel_outputs(nb)) == 2
    for name in SHARED_RUNS:  # what the Curves view drew: training and validation lines
        lines = [json.loads(x) for x in
                 (workspace.root / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if x["split"] == "val"] == [STEPS // 2, STEPS]
        assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_02_fisher_masks(workspace: Workspace) -> None:
    nb = execute(workspace, "02_fisher_masks")
    text = text_of(nb)
    assert f"recorded steps: {list(range(STEPS))}" in text  # record_every = 1 at 10 steps
    assert "k = 14,908 of 4,969,216 eligible backbone entries" in text
    assert images_in_cells(nb) >= 3  # two layer x step heatmaps and the overlap curves
    check_widgets(nb, expected=4)
    quiet = workspace.root / "annealing" / "weatherpeft-no-noise-s0"
    config = json.loads((quiet / "config.json").read_text())
    assert config["method_options"] == {"noise": "none"} and config["steps"] == STEPS
    assert (quiet / "summary.json").is_file()
    assert "Jaccard vs previous" in text and "no noise" in text
    check_shared_runs_untouched(workspace)


@pytest.mark.slow
def test_03_prompt_attention(workspace: Workspace) -> None:
    nb = execute(workspace, "03_prompt_attention")
    text = text_of(nb)
    assert "blocks: ['encoder0.0', 'decoder0.0', 'decoder2.1']" in text
    assert "30 prompt tokens per block, 4 latent levels" in text
    assert "rows sum to 1: [1.]" in text
    assert images_in_cells(nb) >= 1
    check_widgets(nb, expected=3)
    check_shared_runs_untouched(workspace)


@pytest.mark.slow
def test_04_skill_maps(workspace: Workspace) -> None:
    nb = execute(workspace, "04_skill_maps")
    text = text_of(nb)
    assert "significant share" in text and "temperature_850" in text
    assert images_in_cells(nb) >= 1
    check_widgets(nb, expected=2)
    check_shared_runs_untouched(workspace)


@pytest.mark.slow
def test_05_how_it_works(workspace: Workspace) -> None:
    nb = execute(workspace, "05_how_it_works")
    text = text_of(nb)
    expected = [
        "E = embedding_kernels(): shape (64, 12, 2, 4, 4) = (D_e, V, T, P_h, P_w)",
        "X = E flattened             (64, 12, 32)  (D_e, V, S)",
        "feature adapter (over D_e)  (12, 32, 64)  (V, S, D_e)",
        "external attention          (384, 384)",
        "stretched to D_b            (4, 128)  (P, D_b)",
        "equal to generator(E): True",
        "same external attention: True",
        "variable x patch    (12, 2, 4, 4)",
        "windows                (16, 64, 64)   mask (8, 64, 64)",
        "prompts + windows      (16, 68, 64)   mask (8, 68, 68)",
        "prompts dropped        (16, 64, 64)",
        "N = 4,969,216 entries, k = round(0.003 * N) = 14,908",
        "pure Fisher mask: 14908 entries selected",
        "Jaccard with the pure Fisher mask 1.000",  # the last step: no noise left
        "method mask == hand-made step-0 mask: True",
        "non-zero gradients outside the mask: 0",
    ]
    missing = [line for line in expected if line not in text]
    assert not missing, f"not in the outputs: {missing}"
