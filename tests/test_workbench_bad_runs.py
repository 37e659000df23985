"""Bad run directories in the workbench: a half-written run, a garbage ``summary.json``, a cut
``metrics.jsonl``, records of a newer format, a truncated ``fields.nc`` or record chunk. Each
is listed in the overview with its problem, the other views say what is wrong with it in the
page, and the good runs beside it keep working (sessions driven from Python; the runs are
hand-made, as in tests/test_workbench.py, which also covers symlinks planted out of RUNS_DIR)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_workbench import _plain, make_run

from wpeft.app.catalog import Catalog, DataCache

pytest.importorskip("panel")

GOOD = "downscaling/weatherpeft-4pct"


def _half_written(root: Path) -> str:
    run = root / "downscaling/half"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"task": "downscaling", "method": "weatherpeft", "budget": 0.02, "seed": 3}))
    return "downscaling/half"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, GOOD, "weatherpeft", budget=0.04, seed=0)
    make_run(root, "downscaling/full", "full", budget=None, seed=1, records=False)
    return root


def _workbench(root: Path, **selection):
    from wpeft.app.workbench import Workbench

    wb = Workbench(Catalog(root, cache=DataCache()), poll_ms=0, sync_url=False)
    wb.sel.param.update(**selection)
    return wb


def _shows(wb, view: str) -> tuple[bool, str]:
    """Switch to ``view``: (its content is drawn, its message as plain text)."""
    wb.sel.view = view
    v = wb.views[view]
    return v.content.visible, _plain(v.message.object) if v.message.visible else ""


def _good_still_works(root: Path) -> None:
    wb = _workbench(root, run=GOOD)
    for view in ("overview", "fisher", "attention", "skill", "budget"):
        drawn, message = _shows(wb, view)
        assert drawn and not message, (view, message)
    assert wb.views["fisher"].step.options == [0, 10, 20, 30]


def test_half_written_run_is_listed_as_training_and_views_say_what_is_missing(root) -> None:
    name = _half_written(root)
    wb = _workbench(root, run=name)
    drawn, _ = _shows(wb, "overview")
    table = wb.views["overview"].table.value.set_index("run")
    assert drawn and not table.loc[name, "finished"] and table.loc[name, "method"] == "weatherpeft"
    assert table.loc[name, "budget_%"] == pytest.approx(2.0)
    assert "2 training or interrupted" not in wb.views["overview"].caption.object
    assert "1 training or interrupted" in wb.views["overview"].caption.object
    drawn, message = _shows(wb, "fisher")
    assert not drawn and f"Run {name!r} (weatherpeft) has no Fisher-mask records" in message
    assert "has not written its first record yet" in message
    drawn, message = _shows(wb, "attention")
    assert not drawn and "still training" in message
    drawn, message = _shows(wb, "skill")
    assert not drawn and "has no test fields yet (fields.nc is written when training ends)" \
        in message
    drawn, message = _shows(wb, "budget")  # the finished runs are plotted
    assert drawn and "2 finished downscaling runs" in wb.views["budget"].caption.object
    _good_still_works(root)


@pytest.mark.parametrize(("damage", "problem"), [
    ("summary-garbage", "summary.json is not valid JSON"),
    ("config-cut", "config.json is not valid JSON"),
    ("metrics-cut", "metrics.jsonl: the last line is cut off"),
])
def test_unreadable_json_files_are_named_and_the_rest_is_shown(root, damage, problem) -> None:
    name = "downscaling/bad"
    run = make_run(root, name, "weatherpeft", budget=0.01, seed=2)
    if damage == "summary-garbage":
        (run / "summary.json").write_text("this is not JSON at all \x00\x01 {{{")
    elif damage == "config-cut":
        (run / "config.json").write_text('{"task": "downscaling", "method": "weatherp')
    else:
        (run / "metrics.jsonl").write_text('{"step": 10, "split": "val", "loss": 1.0}\n'
                                           '{"step": 20, "split": "val", "lo')
    wb = _workbench(root, run=name)
    drawn, _ = _shows(wb, "overview")
    table = wb.views["overview"].table.value.set_index("run")
    assert drawn and problem in table.loc[name, "problem"]
    assert pd.isna(table.loc[GOOD, "problem"]) and table.loc[GOOD, "rmse/2m_temperature"] == 1.0
    assert "1 run has a problem" in wb.views["overview"].caption.object
    assert str(root.resolve()) not in table.loc[name, "problem"]
    # records and fields are intact: those views still show the run
    drawn, message = _shows(wb, "fisher")
    assert drawn and not message and wb.views["fisher"].step.options == [0, 10, 20, 30]
    drawn, message = _shows(wb, "skill")
    assert drawn and not message
    if damage == "summary-garbage":  # no scores: left out of budget vs skill, said in the table
        assert pd.isna(table.loc[name, "rmse/2m_temperature"])
        drawn, _ = _shows(wb, "budget")
        assert drawn and "2 finished downscaling runs" in wb.views["budget"].caption.object
    _good_still_works(root)


def test_records_of_a_newer_format_are_refused_naming_the_version(root) -> None:
    name = "downscaling/future"
    run = make_run(root, name, "weatherpeft", budget=0.01, seed=2)
    index = run / "records/attention/index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": 7}))
    wb = _workbench(root, run=name)
    _shows(wb, "overview")
    problem = wb.views["overview"].table.value.set_index("run").loc[name, "problem"]
    assert "records/attention/index.json has record format 7" in problem
    drawn, message = _shows(wb, "attention")
    assert not drawn
    assert "has record format 7; this wpeft reads format 1" in message
    assert "upgrade wpeft" in message
    drawn, message = _shows(wb, "fisher")  # its Fisher records are of our format
    assert drawn and not message
    _good_still_works(root)


def test_truncated_binary_files_are_named_in_the_page(root) -> None:
    name = "downscaling/cut"
    run = make_run(root, name, "weatherpeft", budget=0.01, seed=2)
    fields = run / "fields.nc"
    fields.write_bytes(fields.read_bytes()[:300])  # a copy interrupted mid-file
    chunk = run / "records/fisher/step-00000030.nc"
    chunk.write_bytes(chunk.read_bytes()[:200])
    wb = _workbench(root, run=name)
    drawn, message = _shows(wb, "skill")
    assert not drawn and "fields.nc of run 'downscaling/cut' cannot be read" in message
    assert str(root.resolve()) not in message
    drawn, message = _shows(wb, "fisher")
    assert not drawn and "step-00000030.nc" in message and "cannot be read" in message
    drawn, message = _shows(wb, "attention")  # its attention records are intact
    assert drawn and not message
    _good_still_works(root)

