"""wpeft.app without a browser: run names confined to RUNS_DIR, data read once for all sessions,
the server launcher's argument checks, and the workbench's session logic (Panel objects driven
from Python). Runs are hand-made directories with records written through the real
RecordStore (no training), so this file takes seconds; tests/test_workbench_browser.py drives
the served page over real training runs."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from wpeft.app.catalog import (
    Catalog,
    DataCache,
    RunNameError,
    RunsDirError,
    check_runs_dir,
    split_variable,
    validate_run_name,
)
from wpeft.errors import ConfigError, DataError
from wpeft.runs.store import RecordStore

SECRET = "TOP-SECRET-MARKER"


# --------------------------------------------------------------------------- hand-made runs


def _fisher_steps() -> list[xr.Dataset]:
    """One Fisher record per step (0, 10, 20, 30), as the recorder appends them."""
    from test_viz import make_fisher

    ds = make_fisher()
    ds.attrs.update(static_variables="image_rows,image_cols", k=1234, method="weatherpeft")
    return [ds.isel(step=i, drop=True) for i in range(ds.sizes["step"])]


def _attention() -> xr.Dataset:
    from test_viz import make_attention

    return make_attention()


def _fields(seed: int, bias: float = 0.0) -> xr.Dataset:
    """Test predictions and truth of a small downscaling run (6 times, 8 x 16 grid)."""
    rng = np.random.default_rng(seed)
    time = pd.date_range("2000-01-01", periods=6, freq="6h")
    lat = np.linspace(78.75, -78.75, 8)
    lon = np.arange(0.0, 360.0, 22.5)
    truth_t2m = 280 + rng.normal(0, 5, (6, 8, 16))
    truth_t = 250 + rng.normal(0, 5, (6, 2, 8, 16))
    dims3, dims4 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    ds = xr.Dataset(
        {
            "2m_temperature": (dims3, truth_t2m + bias + rng.normal(0, 1 + seed, truth_t2m.shape)),
            "2m_temperature_target": (dims3, truth_t2m),
            "temperature": (dims4, truth_t + rng.normal(0, 2, truth_t.shape)),
            "temperature_target": (dims4, truth_t),
        },
        coords={"time": time, "level": [500, 850], "latitude": lat, "longitude": lon},
    )
    for v in ds.data_vars:
        ds[v].attrs["units"] = "K"
    return ds


def make_run(root: Path, name: str, method: str, *, budget: float | None, seed: int,
             finished: bool = True, records: bool = True, task: str = "downscaling") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"task": task, "method": method, "budget": budget, "seed": 0, "steps": 30}))
    if records:
        store = RecordStore(run, "fisher")
        for step, ds in zip((0, 10, 20, 30), _fisher_steps()):
            store.append(step, ds)
        RecordStore(run, "attention", compress=True).append(30, _attention())
    if finished:
        _fields(seed, bias=0.5 * seed).to_netcdf(run / "fields.nc", engine="netcdf4")
        fraction = budget if budget is not None else 1.06
        (run / "summary.json").write_text(json.dumps({
            "trainable": {"backbone": int(fraction * 5e6), "total": int(fraction * 5.3e6)},
            "changed": {"backbone": int(fraction * 4e6), "total": int(fraction * 4.2e6)},
            "budget_fraction": fraction, "encoder_decoder_policy": "frozen",
            "backbone_parameters": 5_000_000, "adapter_bytes": int(fraction * 1e7),
            "full_checkpoint_bytes": 20_000_000,
            "scores": {"rmse/2m_temperature": 1.0 + seed, "rmse/temperature_850": 2.0 + seed},
        }))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "downscaling/weatherpeft-4pct", "weatherpeft", budget=0.04, seed=0)
    make_run(root, "downscaling/full", "full", budget=None, seed=1, records=False)
    # outside RUNS_DIR: a run the server must never show, and a symlink pointing at it
    outside = tmp_path / "outside" / "run"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps({"task": SECRET, "method": SECRET}))
    (root / "escape").symlink_to(outside.parent, target_is_directory=True)
    return root


@pytest.fixture
def catalog(runs_root: Path) -> Catalog:
    return Catalog(runs_root, cache=DataCache())


# --------------------------------------------------------------------------- confinement


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"), ("  ", "empty"), (None, "empty"),
        ("/etc/passwd", "outside"), ("~/runs", "outside"), ("C:/x", "outside"),
        ("..", "outside"), ("../outside/run", "outside"), ("downscaling/../../outside", "outside"),
        ("a\\b", "invalid"), ("bad\x00name", "invalid"), ("x" * 600, "invalid"),
    ],
)
def test_run_names_are_checked_before_any_file_access(name, reason) -> None:
    with pytest.raises(RunNameError) as info:
        validate_run_name(name)
    assert info.value.reason == reason


def test_resolve_accepts_runs_and_refuses_escapes(catalog: Catalog, runs_root: Path) -> None:
    entry = catalog.resolve("downscaling/weatherpeft-4pct")
    assert entry.path == (runs_root / "downscaling/weatherpeft-4pct").resolve()
    assert entry.method == "weatherpeft" and entry.has_fisher and entry.finished
    assert catalog.resolve("downscaling/./full").name == "downscaling/full"
    with pytest.raises(RunNameError, match="outside the runs directory") as info:
        catalog.resolve("../outside/run")
    assert info.value.reason == "outside"
    # a symlink inside RUNS_DIR that leads out of it
    with pytest.raises(RunNameError, match="symbolic link") as info:
        catalog.resolve("escape/run")
    assert info.value.reason == "outside"
    with pytest.raises(RunNameError, match="no run named 'nope'") as info:
        catalog.resolve("nope")
    assert info.value.reason == "unknown" and "downscaling/full" in str(info.value)
    # a directory inside RUNS_DIR that is not a run is unknown too
    with pytest.raises(RunNameError, match="no run named"):
        catalog.resolve("downscaling")
    for name in ("../outside/run", "escape/run", "nope", "/etc"):
        with pytest.raises(RunNameError) as info:
            catalog.resolve(name)
        assert str(runs_root) not in str(info.value) and SECRET not in str(info.value)


def test_discovery_skips_symlinks_records_and_other_json(catalog: Catalog, runs_root: Path) -> None:
    (runs_root / "notes").mkdir()
    (runs_root / "notes" / "config.json").write_text(json.dumps({"unrelated": True}))
    (runs_root / "broken").mkdir()
    (runs_root / "broken" / "config.json").write_text("{not json")
    linked = runs_root / "linked"
    linked.mkdir()
    outside_cfg = runs_root.parent / "outside" / "run" / "config.json"
    (linked / "config.json").symlink_to(outside_cfg)  # a run whose config is read elsewhere
    names = catalog.names()
    assert names == ["downscaling/full", "downscaling/weatherpeft-4pct"]
    assert all(SECRET not in e.task for e in catalog.runs())


def test_planted_symlinks_and_bad_record_indexes_are_not_read(catalog, runs_root) -> None:
    run = runs_root / "downscaling/full"
    (run / "fields.nc").unlink()
    (run / "fields.nc").symlink_to(runs_root.parent / "outside" / "run" / "config.json")
    # discovery skips (and logs) a run with a planted symlink; a direct read refuses it
    assert catalog.names() == ["downscaling/weatherpeft-4pct"]
    entry = catalog.resolve("downscaling/weatherpeft-4pct")
    with pytest.raises(DataError, match="points outside the runs directory"):
        catalog._file(run, "fields.nc")
    assert catalog._file(entry.path, "fields.nc") is not None
    wp = runs_root / "downscaling/weatherpeft-4pct"
    index = json.loads((wp / "records/fisher/index.json").read_text())
    index["chunks"][0]["file"] = "../../../outside/run/config.json"
    (wp / "records/fisher/index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="bad chunk name"):
        catalog.fisher("downscaling/weatherpeft-4pct")


def test_sanitize_hides_server_paths(catalog: Catalog, runs_root: Path) -> None:
    msg = catalog.sanitize(f"Run {runs_root.resolve()}/x has no fields.nc")
    assert str(runs_root.resolve()) not in msg and "RUNS_DIR/x" in msg


def test_runs_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(RunsDirError, match="does not exist"):
        check_runs_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunsDirError, match="not a directory"):
        check_runs_dir(tmp_path / "file")


def test_split_variable() -> None:
    assert split_variable("temperature_850") == ("temperature", "850")
    assert split_variable("total_precipitation_6hr_12h") == ("total_precipitation_6hr", "12h")
    assert split_variable("2m_temperature") == ("2m_temperature", "")
    assert split_variable("geopotential_at_surface") == ("geopotential_at_surface", "")


# --------------------------------------------------------------------------- caching


def test_data_cache_keys_by_signature_and_evicts() -> None:
    cache = DataCache(max_entries=2)
    calls = []

    def load(v):
        calls.append(v)
        return v

    assert cache.get("a", 1, lambda: load("a1")) == "a1"
    assert cache.get("a", 1, lambda: load("a2")) == "a1"  # same signature: cached
    assert cache.get("a", 2, lambda: load("a3")) == "a3"  # the file changed: reloaded
    cache.get("b", 1, lambda: load("b"))
    cache.get("c", 1, lambda: load("c"))  # evicts "a" (least recently used)
    assert cache.get("a", 2, lambda: load("a4")) == "a4"
    assert calls == ["a1", "a3", "b", "c", "a4"] and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 5)


def test_data_cache_computes_once_under_concurrent_sessions() -> None:
    cache = DataCache()
    started, calls = threading.Event(), []

    def slow():
        calls.append(1)
        started.wait(2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", 0, slow)))
               for _ in range(6)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_catalog_reads_once_and_rereads_appended_records(catalog: Catalog, runs_root) -> None:
    name = "downscaling/weatherpeft-4pct"
    first = catalog.fisher(name)
    assert catalog.fisher(name) is first  # second session: no file read
    assert list(first.step.values) == [0, 10, 20, 30]
    RecordStore(runs_root / name, "fisher").append(40, _fisher_steps()[-1])
    again = catalog.fisher(name)
    assert again is not first and list(again.step.values) == [0, 10, 20, 30, 40]
    # the table follows summary.json
    table = catalog.table()
    assert catalog.table() is table
    assert list(table["run"]) == ["downscaling/full", "downscaling/weatherpeft-4pct"]
    assert "path" not in table.columns and table["finished"].all()
    summary = runs_root / "downscaling/full/summary.json"
    data = json.loads(summary.read_text())
    data["scores"]["rmse/2m_temperature"] = 9.5
    summary.write_text(json.dumps(data))
    assert catalog.table().loc[0, "rmse/2m_temperature"] == 9.5


def test_catalog_skill_maps_and_difference(catalog: Catalog) -> None:
    a, b = "downscaling/weatherpeft-4pct", "downscaling/full"
    assert catalog.skill_variables(a) == ["2m_temperature", "temperature_500", "temperature_850"]
    assert catalog.skill_metrics(a) == ["rmse", "bias"]
    field = catalog.skill_map(a, "temperature_850", "rmse")
    assert field.dims == ("latitude", "longitude") and field.name == "temperature_850"
    diff = catalog.skill_difference(a, b, "rmse")
    assert catalog.skill_difference(a, b, "rmse") is diff
    assert diff.attrs["run_a"] == a and set(diff.variable.values) >= {"2m_temperature"}
    # seed 0 vs seed 1: A has the smaller error noise, so it is better almost everywhere
    assert float(diff.difference.sel(variable="2m_temperature").mean()) < 0


def test_signature_changes_only_with_new_data(catalog: Catalog, runs_root: Path) -> None:
    name = "downscaling/weatherpeft-4pct"
    sig = catalog.signature([name, "../../etc"])
    assert catalog.signature([name, "../../etc"]) == sig
    RecordStore(runs_root / name, "fisher").append(40, _fisher_steps()[-1])
    assert catalog.signature([name]) != sig


def test_catalog_reads_run_directories_of_wpeft_0_1(tmp_path: Path) -> None:
    import shutil

    from test_runs import FIXTURE

    root = tmp_path / "runs"
    shutil.copytree(FIXTURE, root / "downscaling" / "weatherpeft")
    summary = json.loads((FIXTURE / "summary.json").read_text())
    catalog = Catalog(root, cache=DataCache())
    name = "downscaling/weatherpeft"
    assert catalog.names() == [name]
    entry = catalog.resolve(name)
    assert (entry.task, entry.method, entry.budget, entry.seed) == (
        "downscaling", "weatherpeft", 0.003, 0)
    assert entry.finished and entry.has_fisher and entry.has_attention and entry.has_fields
    table = catalog.table()
    assert list(table["run"]) == [name]
    assert table.loc[0, "trainable_backbone"] == summary["trainable"]["backbone"]
    assert table.loc[0, "rmse/2m_temperature"] == summary["scores"]["rmse/2m_temperature"]
    assert list(catalog.fisher(name).step.values) == [0, 2, 3]
    assert list(catalog.attention(name).step.values) == [4]
    assert "temperature_850" in catalog.skill_variables(name)
    assert catalog.skill_map(name, "2m_temperature").dims == ("latitude", "longitude")


# --------------------------------------------------------------------------- malformed runs


def _damage(run: Path, case: str) -> str:
    """Break one file of a hand-made run; returns the problem it must be listed with."""
    summary = run / "summary.json"
    data = json.loads(summary.read_text())
    if case == "trainable-null":
        summary.write_text(json.dumps({**data, "trainable": None}))
        return "summary.json: trainable is null, not an object"
    if case == "summary-missing-keys":
        summary.write_text(json.dumps({k: v for k, v in data.items() if k != "scores"}))
        return "summary.json lacks scores"
    if case == "summary-bad-json":
        summary.write_text('{"trainable": {"backbone": 3,')
        return "summary.json is not valid JSON"
    if case == "config-garbage-bytes":
        (run / "config.json").write_bytes(b"\xff\xfe\x00\x89garbage")
        return "config.json is not UTF-8 text"
    if case == "metrics-truncated":
        (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "lo')
        return "metrics.jsonl: the last line is cut off"
    if case == "records-newer-format":
        index = json.loads((run / "records/fisher/index.json").read_text())
        (run / "records/fisher/index.json").write_text(json.dumps({**index, "format": 2}))
        return "records/fisher/index.json has record format 2"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "trainable-null", "summary-missing-keys", "summary-bad-json", "config-garbage-bytes",
    "metrics-truncated", "records-newer-format",
])
def test_a_malformed_run_is_listed_with_its_problem(workbench_factory, catalog, runs_root,
                                                   case) -> None:
    name, good = "downscaling/damaged", "downscaling/weatherpeft-4pct"
    problem = _damage(make_run(runs_root, name, "weatherpeft", budget=0.01, seed=2), case)
    assert catalog.names() == [name, "downscaling/full", good]
    table = catalog.table().set_index("run")
    assert problem in table.loc[name, "problem"]
    assert table.loc[good, "trainable_backbone"] == int(0.04 * 5e6)
    assert table.loc[good, "rmse/2m_temperature"] == 1.0 and pd.isna(table.loc[good, "problem"])
    wb = workbench_factory()
    overview = wb.views["overview"]
    assert overview.content.visible and not overview.message.visible
    shown = overview.table.value.set_index("run")
    assert problem in shown.loc[name, "problem"] and pd.isna(shown.loc[good, "problem"])
    assert shown.loc[good, "rmse/2m_temperature"] == 1.0
    assert "1 run has a problem" in overview.caption.object
    assert str(runs_root.resolve()) not in shown.loc[name, "problem"]
    wb.sel.view = "budget"
    budget = wb.views["budget"]
    assert budget.content.visible and not budget.message.visible
    assert budget.plot.object is not None
    wb.sel.run = good
    wb.sel.view = "fisher"
    assert wb.views["fisher"].content.visible and list(wb.views["fisher"].step.options)
    wb.sel.run = name
    fisher = wb.views["fisher"]
    if case == "records-newer-format":
        assert not fisher.content.visible and "has record format 2" in _plain(fisher.message.object)
        assert "upgrade wpeft" in _plain(fisher.message.object)
    else:
        assert fisher.content.visible and not fisher.message.visible
    wb.sel.view = "skill"
    assert wb.views["skill"].content.visible


def test_a_run_that_breaks_the_reader_is_listed_not_fatal(catalog, runs_root, monkeypatch) -> None:
    from wpeft.runs.store import Run

    real = Run.row

    def row(self):
        if self.path.name == "full":
            raise TypeError("something unforeseen")
        return real(self)

    monkeypatch.setattr(Run, "row", row)
    table = catalog.table().set_index("run")
    assert "cannot be read (TypeError" in table.loc["downscaling/full", "problem"]
    assert table.loc["downscaling/full", "method"] == "full"
    assert table.loc["downscaling/weatherpeft-4pct", "rmse/2m_temperature"] == 1.0


# --------------------------------------------------------------------------- the server launcher


def _serve_args(*argv: str) -> argparse.Namespace:
    from wpeft.app.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_defaults_to_loopback() -> None:
    args = _serve_args("runs")
    assert args.address == "127.0.0.1" and args.port == 5006 and args.show is False
    assert _serve_args("runs", "--show").show is True


def test_serve_refuses_bad_arguments_with_exit_code_2(tmp_path: Path, capsys) -> None:
    from wpeft.app.serve import main

    assert main(_serve_args(str(tmp_path / "missing"))) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(_serve_args(str(tmp_path / "file"))) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(_serve_args(str(tmp_path), "--basic-auth", str(tmp_path / "users.json"))) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "users.json").write_text("[1, 2]")
    assert main(_serve_args(str(tmp_path), "--basic-auth", str(tmp_path / "users.json"))) == 2
    assert "{user: password}" in capsys.readouterr().err
    assert main(_serve_args(str(tmp_path), "--basic-auth", "short")) == 2
    assert main(_serve_args(str(tmp_path), "--port", "70000")) == 2


def test_serve_module_entry_point_exits_2_on_a_missing_dir(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "wpeft.app.serve", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert "RUNS_DIR" in done.stderr and "does not exist" in done.stderr


# --------------------------------------------------------------------------- session logic


@pytest.fixture
def workbench_factory(catalog: Catalog):
    pytest.importorskip("panel")
    from wpeft.app.workbench import Workbench

    def make(theme: str | None = None) -> Workbench:
        return Workbench(catalog, poll_ms=0, sync_url=False, theme=theme)

    return make


def _plain(html: str) -> str:
    import html as html_lib
    import re

    return html_lib.unescape(re.sub(r"<[^>]+>", "", html))


def test_workbench_views_follow_the_selection(workbench_factory) -> None:
    import holoviews as hv

    wb = workbench_factory()
    assert wb.sel.run == "downscaling/weatherpeft-4pct"  # the first run with Fisher records
    overview = wb.views["overview"]
    assert list(overview.table.value["run"]) == ["downscaling/full", "downscaling/weatherpeft-4pct"]
    assert {"trainable_backbone", "changed_backbone", "budget_%", "rmse/2m_temperature"} <= set(
        overview.table.value.columns)

    wb.sel.view = "fisher"
    fisher = wb.views["fisher"]
    assert wb.main[1] is fisher.panel and wb.nav.value == "fisher"
    assert list(fisher.step.options) == [0, 10, 20, 30] and fisher.step.value == 30
    assert isinstance(fisher.heatmap.object, hv.HeatMap)
    assert fisher.image.alt_text.endswith("mask at step 30")  # a pre-rendered image
    fisher.step.value = 10  # the player
    assert wb.sel.step == 10 and fisher.image.alt_text.endswith("mask at step 10")
    assert "**step 10**" in fisher.caption.object
    fisher.matrix.value = "decoder2.1/fc1"
    assert fisher.image.alt_text == "decoder2.1/fc1 mask at step 10"
    wb.sel.step = 999  # e.g. from a shared URL of a longer run: falls back to the last step
    assert fisher.step.value == 30

    wb.sel.view = "attention"
    att = wb.views["attention"]
    assert list(att.block.options) == ["encoder0.0", "decoder2.1"]
    att.block.value = "decoder2.1"
    att.prompt.value = 2
    assert "block decoder2.1" in att.var_var.alt_text  # a pre-rendered image
    assert att.var_patch.alt_text.startswith("external attention over patch positions")
    assert "prompt 2" in att.prompt_map.object.opts.get().kwargs["title"]

    wb.sel.view = "skill"
    skill = wb.views["skill"]
    assert isinstance(skill.maps.object, hv.Image)  # one run: its map
    wb.run_b_select.value = "downscaling/full"
    assert isinstance(skill.maps.object, hv.Layout) and len(skill.maps.object) == 3
    skill.variable.value = "temperature"
    assert skill.level.visible and list(skill.level.options) == ["500", "850"]
    skill.level.value = "850"
    skill.metric.value = "bias"
    assert wb.sel.variable == "temperature" and wb.sel.level == "850"
    assert "temperature_850" in skill.caption.object and "bias" in skill.caption.object
    assert "paired t-test with AR(1) effective sample size" in skill.caption.object
    assert "median n_eff" in skill.caption.object

    wb.sel.view = "budget"
    budget = wb.views["budget"]
    assert budget.score.value == "rmse/2m_temperature"
    assert "budget vs rmse/2m_temperature" in budget.plot.object.opts.get().kwargs["title"]
    budget.score.value = "rmse/temperature_850"
    assert "rmse/temperature_850" in budget.plot.object.opts.get().kwargs["title"]


def test_runs_table_and_budget_plot_show_the_three_sizes(workbench_factory, runs_root) -> None:
    import holoviews as hv

    # a run written before the sizes were recorded (no backbone or full checkpoint bytes)
    old = make_run(runs_root, "downscaling/old-lora", "lora", budget=0.01, seed=2, records=False)
    summary = json.loads((old / "summary.json").read_text())
    del summary["backbone_parameters"], summary["full_checkpoint_bytes"]
    (old / "summary.json").write_text(json.dumps(summary))
    wb = workbench_factory()
    shown = wb.views["overview"].table.value.set_index("run")
    sizes = ["k_%", "changed_%", "adapter_MB", "adapter_%"]
    after = list(shown.columns).index("steps") + 1
    assert list(shown.columns[after:after + 4]) == sizes  # beside the identity columns
    # by hand from make_run: changed total int(f * 4.2e6) of 5e6 backbone parameters, the
    # adapter int(f * 1e7) bytes of a 2e7-byte full checkpoint
    expected = {
        "downscaling/weatherpeft-4pct": [4.0, 100 * 168_000 / 5e6, 0.4, 2.0],
        "downscaling/full": [106.0, 100 * 4_452_000 / 5e6, 10.6, 53.0],
    }
    for run, values in expected.items():
        assert shown.loc[run, sizes].tolist() == pytest.approx(values, rel=1e-12), run
    assert shown.loc["downscaling/old-lora", "k_%"] == pytest.approx(1.0)
    assert shown.loc["downscaling/old-lora", "adapter_MB"] == pytest.approx(0.1)
    assert shown.loc["downscaling/old-lora", ["changed_%", "adapter_%"]].isna().all()

    wb.sel.view = "budget"
    budget = wb.views["budget"]
    assert budget.size.value == "budget_fraction" and wb.sel.size == "budget_fraction"

    def xs() -> dict[str, float]:
        """The x of each method's one run."""
        scatters = [el for el in budget.plot.object if isinstance(el, hv.Scatter)]
        assert all(len(el) == 1 for el in scatters)
        return {el.label: float(el.dimension_values(0)[0]) for el in scatters}

    assert xs() == pytest.approx({"weatherpeft": 4.0, "full": 106.0, "lora": 1.0})
    assert "per-step k" in budget.caption.object
    budget.size.value = "changed_fraction"
    assert wb.sel.size == "changed_fraction"
    assert xs() == pytest.approx({"weatherpeft": 3.36, "full": 89.04})  # old-lora: unknown
    assert budget.plot.object.get(0).kdims[0].label.startswith("changed parameters")
    assert "2 finished downscaling runs" in budget.caption.object
    budget.size.value = "adapter_fraction"
    assert xs() == pytest.approx({"weatherpeft": 2.0, "full": 53.0})
    wb.sel.size = "nonsense"  # e.g. from a URL: back to the default
    assert budget.size.value == "budget_fraction" and wb.sel.size == "budget_fraction"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../outside/run", "outside the runs directory"),
        ("escape/run", "symbolic link"),
        ("/etc", "absolute path"),
        ("nope", "There is no run named 'nope'"),
        ("<img src=x onerror=alert(1)>", "There is no run named"),
    ],
)
def test_bad_run_names_show_a_clear_message(workbench_factory, runs_root, name, expected) -> None:
    wb = workbench_factory()
    wb.sel.view = "fisher"
    wb.sel.run = name
    view = wb.views["fisher"]
    assert view.message.visible and not view.content.visible
    text = _plain(view.message.object)
    assert expected in text
    assert "<img" not in view.message.object  # user input is escaped
    assert wb.run_message.visible and expected in _plain(wb.run_message.object)
    assert wb.run_select.value == ""  # the select shows "choose a run", not a stale run
    for shown in (view.message.object, wb.run_message.object, view.caption.object):
        assert str(runs_root.resolve()) not in shown and SECRET not in shown
    wb.run_select.value = "downscaling/weatherpeft-4pct"  # choosing a run clears it
    assert view.content.visible and not view.message.visible and not wb.run_message.visible


def test_runs_without_records_say_why(workbench_factory) -> None:
    wb = workbench_factory()
    wb.sel.run = "downscaling/full"
    wb.sel.view = "fisher"
    assert "has no Fisher-mask records" in _plain(wb.views["fisher"].message.object)
    wb.sel.view = "attention"
    assert "no prompt-attention records" in _plain(wb.views["attention"].message.object)


def test_sessions_are_independent_and_share_loaded_data(workbench_factory, catalog) -> None:
    one = workbench_factory()
    one.sel.view = "fisher"
    misses = catalog.cache.misses
    two = workbench_factory()
    two.sel.view = "fisher"
    assert catalog.cache.misses == misses  # nothing was read again for the second session
    one.views["fisher"].step.value = 0
    assert two.views["fisher"].step.value == 30 and two.sel.step == 30
    one.sel.run = "downscaling/full"
    assert two.sel.run == "downscaling/weatherpeft-4pct"
    assert one.views["fisher"].heatmap is not two.views["fisher"].heatmap


def test_poll_redraws_when_a_run_writes_records(workbench_factory, runs_root) -> None:
    wb = workbench_factory()
    wb.sel.view = "fisher"
    fisher = wb.views["fisher"]
    assert wb.poll() is False  # nothing new
    RecordStore(runs_root / "downscaling/weatherpeft-4pct", "fisher").append(
        40, _fisher_steps()[-1])
    assert wb.poll() is True
    assert list(fisher.step.options) == [0, 10, 20, 30, 40]
    assert fisher.step.value == 40  # it was at the last step: it follows the new record
    fisher.step.value = 10
    RecordStore(runs_root / "downscaling/weatherpeft-4pct", "fisher").append(
        50, _fisher_steps()[-1])
    assert wb.poll() is True and fisher.step.value == 10  # elsewhere: it stays
    # a new run shows up in the run list
    wb.cat.discovery_ttl = 0
    make_run(runs_root, "downscaling/lora", "lora", budget=0.04, seed=2, records=False)
    assert wb.poll() is True
    assert "downscaling/lora" in wb.run_select.options.values()


def test_empty_runs_dir_explains_how_to_make_a_run(tmp_path: Path) -> None:
    pytest.importorskip("panel")
    from wpeft.app.workbench import Workbench

    wb = Workbench(Catalog(tmp_path, cache=DataCache()), poll_ms=0, sync_url=False)
    message = _plain(wb.views["overview"].message.object)
    assert "No runs found" in message and "wpeft train" in message
    wb.sel.view = "fisher"
    assert "No runs found" in _plain(wb.views["fisher"].message.object)


def test_build_workbench_refuses_a_missing_dir(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("panel")
    from wpeft.app.workbench import build_workbench, runs_dir_from_argv

    with pytest.raises(RunsDirError):
        build_workbench(tmp_path / "missing", poll_ms=0, sync_url=False)
    assert runs_dir_from_argv(["some/dir"]) == Path("some/dir")
    monkeypatch.delenv("WPEFT_RUNS_DIR", raising=False)
    with pytest.raises(SystemExit, match="runs directory"):
        runs_dir_from_argv([])


# --------------------------------------------------------------------------- curves, scorecard,
# N-run comparison and downloads


def _write_metrics(run: Path, lines: list[dict], tail: str = "") -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)


_TRAIN = [{"step": s, "split": "train", "loss": v} for s, v in ((1, 1.0), (2, 0.5), (3, 0.25))]
_VAL = [{"step": 2, "split": "val", "loss": 0.9, "rmse/2m_temperature": 3.0},
        {"step": 2, "split": "val", "loss": 0.8, "rmse/2m_temperature": 2.0}]  # logged twice


def test_metrics_log_reads_only_what_was_appended(tmp_path: Path, monkeypatch) -> None:
    """A live run's metrics.jsonl is parsed line by line once: a read after an append parses
    the new lines only; a cut-off last line is parsed again until it is whole; a file replaced
    (as a resumed run does) or shortened is read afresh, with the right line numbers."""
    import os

    from wpeft.app import catalog as catalog_module
    from wpeft.app.catalog import MetricsLog, read_metrics_lines

    parsed: list[bytes | str] = []
    loads = json.loads

    def counting(text):  # type: ignore[no-untyped-def]
        parsed.append(text)
        return loads(text)

    monkeypatch.setattr(catalog_module.json, "loads", counting)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    log = MetricsLog()
    assert log.read(path) == ([{"step": 1}, {"step": 2}], [])
    assert len(parsed) == 2
    with path.open("a") as f:
        f.write('not json\n{"step": 4}\n{"step": 5, "spl')
    parsed.clear()
    lines, problems = log.read(path)
    assert lines == [{"step": 1}, {"step": 2}, {"step": 4}] and len(parsed) == 3  # new ones only
    assert problems == ["metrics.jsonl line 4 is not a JSON object; skipped",
                        ("metrics.jsonl line 6 (the last) is cut off; skipped, the curves end "
                         "at the line before it")]
    assert (lines, problems) == read_metrics_lines(path)  # as a whole read gives
    with path.open("a") as f:
        f.write('it": "val"}\n')
    parsed.clear()
    lines, problems = log.read(path)
    assert lines[-1] == {"step": 5, "split": "val"}
    assert problems == ["metrics.jsonl line 4 is not a JSON object; skipped"]
    assert len(parsed) == 1
    # replaced by a shorter file (a resumed run rewrites it atomically): read afresh
    new = tmp_path / "new.jsonl"
    new.write_text('{"step": 9}\n')
    os.replace(new, path)
    assert log.read(path) == ([{"step": 9}], [])
    # shortened in place, then grown past the old end with other bytes: read afresh
    path.write_text('{"step": 1}\n')
    assert log.read(path) == ([{"step": 1}], [])
    path.write_text('{"step": 7}\n{"step": 8}\n')
    assert log.read(path) == ([{"step": 7}, {"step": 8}], [])


def test_catalog_curves_long_table_and_bad_lines(catalog: Catalog, runs_root: Path) -> None:
    wp = runs_root / "downscaling/weatherpeft-4pct"
    _write_metrics(wp, [_TRAIN[0], _VAL[0]], tail="not json\n")
    with (wp / "metrics.jsonl").open("a") as f:  # line 3 garbled, then lines 4-6
        f.write("".join(json.dumps(x) + "\n" for x in [*_TRAIN[1:], _VAL[1]]))
        f.write('{"step": 4, "split": "tr')  # line 7: cut off
    frame = catalog.curves(["downscaling/weatherpeft-4pct"])
    assert list(frame.columns) == ["run", "method", "split", "step", "column", "value"]
    train = frame[frame["split"] == "train"]
    assert train["step"].tolist() == [1, 2, 3] and train["value"].tolist() == [1.0, 0.5, 0.25]
    val = frame[frame["split"] == "val"].set_index("column")["value"]
    # the last line of step 2; its "loss" is the training loss, which the train line gives
    assert val.to_dict() == {"rmse/2m_temperature": 2.0}
    problems = frame.attrs["problems"]
    assert len(problems) == 2
    assert "downscaling/weatherpeft-4pct: metrics.jsonl line 3 is not a JSON object" in problems[0]
    assert "metrics.jsonl line 7 (the last) is cut off" in problems[1]
    # a run without metrics.jsonl adds no row; cached until the file changes
    both = catalog.curves(["downscaling/weatherpeft-4pct", "downscaling/full"])
    assert set(both["run"]) == {"downscaling/weatherpeft-4pct"}
    misses = catalog.cache.misses
    catalog.curves(["downscaling/weatherpeft-4pct"])
    assert catalog.cache.misses == misses
    _write_metrics(wp, _TRAIN)
    assert len(catalog.curves(["downscaling/weatherpeft-4pct"])) == 3
    assert catalog.curves(["downscaling/weatherpeft-4pct"]).attrs["problems"] == []


def test_the_loss_of_validation_lines_is_drawn_as_training_loss(
    catalog: Catalog, runs_root: Path
) -> None:
    """A validation line's ``loss`` is the training loss of its step (the loop logs it there):
    never a "validation loss"; a training point where no train line has that step."""
    wp = runs_root / "downscaling/weatherpeft-4pct"
    _write_metrics(wp, [_TRAIN[0],
                        {"step": 1, "split": "val", "loss": 7.0, "rmse/2m_temperature": 3.0},
                        {"step": 4, "split": "val", "loss": 0.2, "rmse/2m_temperature": 1.5}])
    frame = catalog.curves(["downscaling/weatherpeft-4pct"])
    assert not ((frame["split"] == "val") & (frame["column"] == "loss")).any()
    train = frame[frame["split"] == "train"]
    assert train["step"].tolist() == [1, 4]
    assert train["value"].tolist() == [1.0, 0.2]  # step 1 from its train line, 4 from val's
    val = frame[frame["split"] == "val"]
    assert val["step"].tolist() == [1, 4] and val["value"].tolist() == [3.0, 1.5]


def test_curves_view_smoothing_log_axis_and_warning(workbench_factory, runs_root) -> None:
    import holoviews as hv

    wp = runs_root / "downscaling/weatherpeft-4pct"
    _write_metrics(wp, [*_TRAIN, _VAL[1]], tail='{"step": 4, "split"')
    _write_metrics(runs_root / "downscaling/full",
                   [{"step": 1, "split": "train", "loss": 2.0},
                    {"step": 3, "split": "train", "loss": 1.0}])
    wb = workbench_factory()
    wb.sel.view = "curves"
    view = wb.views["curves"]
    assert view.content.visible  # drawn, with the warning above it
    assert view.message.visible
    assert "metrics.jsonl line 5 (the last) is cut off" in _plain(view.message.object)
    assert list(view.curve.options.values()) == ["train:loss", "val:rmse/2m_temperature"]
    overlay = view.plot.object
    assert isinstance(overlay, hv.Overlay) and len(overlay) == 1  # run A only by default
    assert overlay.get(0).dimension_values(1).tolist() == [1.0, 0.5, 0.25]
    view.smoothing.value = 0.5  # s0 = 1; s1 = .5 * 1 + .5 * .5 = .75; s2 = .5 * .75 + .5 * .25
    assert wb.sel.smoothing == 0.5
    assert view.plot.object.get(0).dimension_values(1).tolist() == pytest.approx([1, 0.75, 0.5])
    assert "EMA weight 0.5 applied to the plotted lines" in view.caption.object
    view.logy.value = True
    assert wb.sel.logy is True and view.plot.object.opts.get().kwargs["logy"] is True
    # N runs: one curve each, the method's colour
    wb.runs_select.value = ["downscaling/weatherpeft-4pct", "downscaling/full"]
    assert wb.sel.runs == "downscaling/weatherpeft-4pct,downscaling/full"
    curves = list(view.plot.object)
    assert [c.label for c in curves] == ["downscaling/weatherpeft-4pct", "downscaling/full"]
    assert curves[1].dimension_values(1).tolist() == pytest.approx([2.0, 1.5])  # EMA 0.5
    colors = {c.opts.get().kwargs["color"] for c in curves}
    assert len(colors) == 2
    view.curve.value = "val:rmse/2m_temperature"
    assert len(view.plot.object) == 1 and "no such lines: downscaling/full" in _plain(
        view.caption.object)
    wb.sel.smoothing = 5  # e.g. from a URL: back to raw lines
    assert view.smoothing.value == 0.0 and wb.sel.smoothing == 0.0


def _rmse_by_hand(fields: xr.Dataset, var: str) -> tuple[float, np.ndarray]:
    """Latitude-weighted (cos φ) RMSE over the test period and the per-time MSE, by hand."""
    e2 = (fields[var] - fields[f"{var}_target"]).values ** 2
    w = np.cos(np.deg2rad(fields["latitude"].values))
    per_time = (e2 * w[None, :, None]).sum((1, 2)) / (w.sum() * e2.shape[2])
    return float(np.sqrt(per_time.mean())), per_time


def test_scorecard_view_cells_by_hand(workbench_factory, runs_root) -> None:
    from wpeft.metrics.significance import paired_ttest_ar1

    runs = {"full": runs_root / "downscaling/full", "wp": runs_root / "downscaling/weatherpeft-4pct"}
    rmse, mse = {}, {}
    for key, run in runs.items():  # the summaries' scores are the fields' RMSE
        with xr.open_dataset(run / "fields.nc") as f:
            rmse[key], mse[key] = _rmse_by_hand(f.load(), "2m_temperature")
        summary = json.loads((run / "summary.json").read_text())
        summary["scores"] = {"rmse/2m_temperature": rmse[key]}
        (run / "summary.json").write_text(json.dumps(summary))
    wb = workbench_factory()
    wb.sel.view = "scorecard"
    view = wb.views["scorecard"]
    assert view.reference.value == "downscaling/full"  # the Full-Tuning run by default
    heat = view.plot.object.get(0)
    cells = heat.dframe().set_index("run")
    assert list(cells.index) == ["downscaling/full", "downscaling/weatherpeft-4pct"]
    diff = 100 * (rmse["wp"] - rmse["full"]) / rmse["full"]
    p = float(paired_ttest_ar1(mse["wp"], mse["full"]).pvalue)
    wp = cells.loc["downscaling/weatherpeft-4pct"]
    assert wp["value"] == pytest.approx(rmse["wp"], rel=1e-5)
    assert wp["oriented_difference"] == pytest.approx(diff, rel=1e-5)
    assert bool(wp["significant"]) == (p < 0.05)
    edges = [-50, -20, -10, -5, -2, -1, 1, 2, 5, 10, 20, 50]
    assert wp["bin"] == sum(e <= diff for e in edges)  # colour index of the ±1..50 % bins
    assert wp["label"] == f"{rmse['wp']:.3g}" + (" •" if p < 0.05 else "")
    assert cells.loc["downscaling/full", "oriented_difference"] == 0.0
    assert cells.loc["downscaling/full", "bin"] == 6  # the white middle bin
    assert "blue = better than the reference" in view.caption.object
    # a colour bar with a tick at each bin edge, between the colours it separates
    bar = heat.opts.get().kwargs["colorbar_opts"]
    assert heat.opts.get().kwargs["colorbar"] is True
    assert bar["ticker"].ticks == [i + 0.5 for i in range(len(edges))]
    assert list(bar["major_label_overrides"].values()) == [f"{e:+g}" for e in edges]
    assert "negative / blue = better" in heat.opts.get().kwargs["clabel"]
    # the other run as reference: the sign flips, the card follows the URL value
    wb.sel.reference = "downscaling/weatherpeft-4pct"
    cells = view.plot.object.get(0).dframe().set_index("run")
    assert cells.index[0] == "downscaling/weatherpeft-4pct"
    assert cells.loc["downscaling/full", "oriented_difference"] == pytest.approx(
        100 * (rmse["full"] - rmse["wp"]) / rmse["wp"], rel=1e-5)
    # a refusal (another task) is the view's message
    make_run(runs_root, "postprocessing/full", "full", budget=None, seed=2, records=False,
             task="postprocessing")
    wb.cat.discovery_ttl = 0
    wb.sel.runs = "downscaling/full,postprocessing/full"
    assert view.message.visible and "another task" in _plain(view.message.object)
    assert str(runs_root.resolve()) not in view.message.object


def test_runs_choice_unknown_names_and_budget_restriction(workbench_factory, runs_root) -> None:
    import holoviews as hv

    make_run(runs_root, "downscaling/lora", "lora", budget=0.01, seed=2, records=False)
    wb = workbench_factory()
    assert set(wb.runs_select.options.values()) == {
        "downscaling/full", "downscaling/lora", "downscaling/weatherpeft-4pct"}
    wb.sel.runs = "downscaling/lora, ../outside/run,downscaling/full"  # e.g. from a URL
    assert [e.name for e in wb.chosen_runs()] == ["downscaling/lora", "downscaling/full"]
    assert wb.runs_select.value == ["downscaling/lora", "downscaling/full"]
    assert wb.run_message.visible
    assert "Compare runs: Run name '../outside/run' points outside" in _plain(
        wb.run_message.object)
    assert wb.url_query()["runs"] == "downscaling/lora, ../outside/run,downscaling/full"
    wb.sel.view = "budget"
    labels = {el.label for el in wb.views["budget"].plot.object if isinstance(el, hv.Scatter)}
    assert labels == {"lora", "full"}
    assert "the runs chosen under *Compare runs*" in wb.views["budget"].caption.object
    wb.runs_select.value = []
    assert wb.sel.runs == "" and not wb.run_message.visible
    labels = {el.label for el in wb.views["budget"].plot.object if isinstance(el, hv.Scatter)}
    assert labels == {"lora", "full", "weatherpeft"}


def test_run_names_with_commas_round_trip_through_the_runs_choice(
        workbench_factory, runs_root) -> None:
    from wpeft.app.workbench import join_names, split_names

    make_run(runs_root, "downscaling/lora,r=8", "lora", budget=0.01, seed=2, records=False)
    make_run(runs_root, "downscaling/100%", "full", budget=None, seed=3, records=False)
    wb = workbench_factory()
    chosen = ["downscaling/lora,r=8", "downscaling/100%", "downscaling/full"]
    wb.runs_select.value = chosen
    assert wb.sel.runs == "downscaling/lora%2Cr=8,downscaling/100%25,downscaling/full"
    assert [e.name for e in wb.chosen_runs()] == chosen
    other = workbench_factory()  # a session opened from that URL value
    other.sel.runs = wb.sel.runs
    assert other.runs_select.value == chosen and not other.run_message.visible
    assert split_names(join_names(["a,b", "%2C", " c "])) == ["a,b", "%2C", "c"]
    assert split_names("a, b,a,,") == ["a", "b"]


def test_downloads_give_png_csv_and_netcdf(workbench_factory, runs_root, tmp_path) -> None:
    import matplotlib.image

    _write_metrics(runs_root / "downscaling/weatherpeft-4pct", _TRAIN)
    wb = workbench_factory()
    wb.sel.view = "curves"
    view = wb.views["curves"]
    png = view.download_figure.callback().getvalue()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "curves.png").write_bytes(png)
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 400  # 200 dpi
    assert view.download_figure.filename == "curves-downscaling_weatherpeft-4pct-train_loss.png"
    svg = view.download_svg.callback().getvalue()
    assert view.download_svg.filename == "curves-downscaling_weatherpeft-4pct-train_loss.svg"
    root = ElementTree.fromstring(svg)
    assert root.tag.endswith("svg") and b"<image" not in svg  # lines and text as vectors
    csv = view.download_data.callback().getvalue().decode()
    back = pd.read_csv(__import__("io").StringIO(csv))
    pd.testing.assert_frame_equal(back, wb.cat.curves(["downscaling/weatherpeft-4pct"]))
    for key, suffix in [("fisher", "nc"), ("attention", "nc"), ("skill", "nc"),
                        ("budget", "csv"), ("scorecard", "csv"), ("overview", "csv")]:
        wb.sel.view = key
        v = wb.views[key]
        data = v.download_data.callback().getvalue()
        assert v.download_data.filename.endswith(f".{suffix}"), key
        if suffix == "nc":
            assert data[:4] == b"\x89HDF", key
            (tmp_path / f"{key}.nc").write_bytes(data)
            with xr.open_dataset(tmp_path / f"{key}.nc") as ds:
                assert ds.data_vars, key
        else:
            assert not pd.read_csv(__import__("io").StringIO(data.decode())).empty, key
        if v.download_figure is not None:
            assert v.download_figure.callback().getvalue()[:4] == b"\x89PNG", key
            assert ElementTree.fromstring(v.download_svg.callback().getvalue()).tag.endswith(
                "svg"), key
    card = pd.read_csv(__import__("io").StringIO(
        wb.views["scorecard"].download_data.callback().getvalue().decode()))
    assert set(card["run"]) == {"downscaling/full", "downscaling/weatherpeft-4pct"}
    assert str(runs_root.resolve()) not in card.to_csv()  # no server path in a download
    # a view that drew nothing says so in its message instead of sending a file
    wb.sel.run = "downscaling/full"
    wb.sel.view = "fisher"
    with pytest.raises(DataError):
        wb.views["fisher"].download_figure.callback()
    assert "shows nothing yet" in _plain(wb.views["fisher"].message.object)


def test_workbench_view_gives_a_notebook_the_dashboards_view(runs_root) -> None:
    """``workbench_view`` is the dashboard's view for a notebook: the same plot (the curves of
    the chosen runs, the scorecard against the reference), its widgets and downloads; an
    unknown view or choice and the view's own error are raised, naming them."""
    pytest.importorskip("panel")
    import holoviews as hv
    import panel as pn

    from wpeft.app.workbench import workbench_view

    wp, full = "downscaling/weatherpeft-4pct", "downscaling/full"
    _write_metrics(runs_root / wp, _TRAIN)
    _write_metrics(runs_root / full, [{"step": 1, "split": "train", "loss": 2.0}])
    curves = workbench_view(runs_root, "curves", runs=[wp, full], smoothing=0.0)
    assert isinstance(curves, pn.Column) and "wb-view-curves" in curves.css_classes
    plots = [o.object for o in curves.select(pn.pane.HoloViews)]
    assert len(plots) == 1 and isinstance(plots[0], hv.Overlay)
    assert [c.label for c in plots[0]] == [wp, full]
    assert plots[0].get(0).dimension_values(1).tolist() == [1.0, 0.5, 0.25]
    assert curves.select(pn.widgets.FileDownload)  # figure (PNG, SVG) and data downloads
    card = workbench_view(runs_root, "scorecard", runs=f"{wp},{full}", reference=full)
    heat = next(o.object for o in card.select(pn.pane.HoloViews)).get(0)
    assert isinstance(heat, hv.HeatMap)
    assert set(heat.dimension_values("run")) == {wp, full}
    with pytest.raises(ConfigError, match="Unknown workbench view 'curvez'.*'curves'"):
        workbench_view(runs_root, "curvez")
    with pytest.raises(ConfigError, match=r"Unknown workbench choice\(s\) \['rnus'\]"):
        workbench_view(runs_root, "curves", rnus=[wp])
    with pytest.raises(ConfigError, match=r"\['view'\]"):
        workbench_view(runs_root, "curves", view="budget")
    with pytest.raises(RunNameError, match="no-such-run"):  # what the view's message says
        workbench_view(runs_root, "fisher", run="downscaling/no-such-run")


def test_warm_up_computes_the_default_scorecard_once_for_every_session(
    catalog: Catalog, workbench_factory
) -> None:
    """The server's warm-up reads what the Scorecard view shows without a choice (every
    finished run of the default run's task against its Full-Tuning run): a session opening
    the view reads nothing more."""
    catalog.warm_up()
    misses = catalog.cache.misses
    wb = workbench_factory()
    wb.sel.view = "scorecard"
    view = wb.views["scorecard"]
    assert view.plot.object is not None and view.reference.value == "downscaling/full"
    assert catalog.cache.misses == misses
    assert catalog.default_reference(["downscaling/weatherpeft-4pct"], "x") == (
        "downscaling/weatherpeft-4pct")  # no Full-Tuning run among them: the first


def test_svg_downloads_embed_only_large_meshes_as_images() -> None:
    """A colour mesh of more than SVG_MESH_CELLS cells goes into the SVG as one image (a
    global field as vector quads would be a million paths); a small one stays vectors."""
    from matplotlib.figure import Figure

    from wpeft.app.workbench import SVG_MESH_CELLS, file_bytes

    def svg_of(n: int) -> bytes:
        fig = Figure()
        fig.add_subplot().pcolormesh(np.arange(n * n, dtype=float).reshape(n, n))
        data, suffix = file_bytes(fig, "svg")
        assert suffix == "svg"
        return data

    small, large = 20, int(SVG_MESH_CELLS**0.5) + 5
    assert small * small <= SVG_MESH_CELLS < large * large
    vector = svg_of(small)
    assert b"<image" not in vector and vector.count(b"<path") >= small * small
    raster = svg_of(large)
    assert b"<image" in raster and raster.count(b"<path") < 100
    with pytest.raises(ValueError, match="image must be 'png' or 'svg'"):
        file_bytes(Figure(), "jpg")


def test_poll_redraws_curves_while_a_run_trains(workbench_factory, runs_root) -> None:
    wp = runs_root / "downscaling/weatherpeft-4pct"
    _write_metrics(wp, _TRAIN[:2])
    wb = workbench_factory()
    wb.sel.view = "curves"
    view = wb.views["curves"]
    assert len(view.plot.object.get(0)) == 2
    wb.poll()
    assert wb.poll() is False
    with (wp / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(_TRAIN[2]) + "\n")
    assert wb.poll() is True
    assert view.plot.object.get(0).dimension_values(0).tolist() == [1, 2, 3]


# --------------------------------------------------------------------------- lighter sessions


def test_a_view_is_built_only_when_it_is_opened(workbench_factory) -> None:
    wb = workbench_factory()
    assert [v.key for v in wb.views.built()] == ["overview"]  # the page shows the overview
    assert "fisher" in wb.views and len(wb.views) == len(list(wb.views)) == 7
    wb.sel.view = "budget"
    assert [v.key for v in wb.views.built()] == ["overview", "budget"]
    assert wb.main[1] is wb.views["budget"].panel
    # a change of runs marks only the views made so far; the others draw when first opened
    wb.sel.run = "downscaling/full"
    assert [v.key for v in wb.views.built()] == ["overview", "budget"]
    wb.sel.view = "attention"
    assert "no prompt-attention records" in _plain(wb.views["attention"].message.object)
    with pytest.raises(KeyError, match="no view 'nope'"):
        wb.views["nope"]


def test_a_url_view_builds_that_view_only(catalog) -> None:
    from wpeft.app.workbench import Selection, Workbench

    original = Selection.param.view.default
    Selection.param.view.default = "fisher"  # as if the URL said ?view=fisher
    try:
        wb = Workbench(catalog, poll_ms=0, sync_url=False)
    finally:
        Selection.param.view.default = original
    assert [v.key for v in wb.views.built()] == ["fisher"]
    assert wb.main[1] is wb.views["fisher"].panel


def test_fisher_images_are_the_viz_figures_rendered_once_for_all_sessions(
        workbench_factory, catalog) -> None:
    from wpeft.viz.fisher import (
        mask_image_png,
        overlap_curves_png,
        plot_mask_image,
        plot_overlap_curves,
    )
    from wpeft.viz.style import figure_png

    one = workbench_factory()
    one.sel.view = "fisher"
    view = one.views["fisher"]
    ds = catalog.fisher("downscaling/weatherpeft-4pct")
    # the bytes shown are those of the wpeft.viz matplotlib figures (as `wpeft figures` draws)
    assert view.image.object == figure_png(plot_mask_image(ds, one.sel.matrix, 30))
    assert view.image.object == mask_image_png(ds, one.sel.matrix, 30)
    assert view.curves.object == figure_png(plot_overlap_curves(ds, None, None))
    assert view.image.object[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(view.image.object)).shape[:2] == (336, 384)
    assert view.curves.alt_text == "mask overlap over training"
    rendered = len(catalog.images)
    assert rendered == 2 and catalog.images.misses == 2

    two = workbench_factory()  # another session: the same bytes, nothing rendered again
    two.sel.view = "fisher"
    assert two.views["fisher"].image.object is view.image.object
    assert len(catalog.images) == 2 and catalog.images.misses == 2 and catalog.images.hits == 2

    view.step.value = 10  # a new step: one new image, the curves kept
    assert catalog.images.misses == 3 and view.image.alt_text.endswith("at step 10")
    view.tensor.value = "qkv"  # another tensor kind: new curves, titled with it
    assert view.curves.alt_text == "mask overlap over training (qkv tensors)"
    assert view.curves.object == overlap_curves_png(ds, None, "qkv")
    assert catalog.images.misses == 4


def test_attention_kernels_are_the_viz_figures_rendered_once_for_all_sessions(
        workbench_factory, catalog) -> None:
    from wpeft.viz.attention import plot_patch_attention, plot_variable_attention
    from wpeft.viz.style import figure_png, themed_png

    one = workbench_factory()
    one.sel.view = "attention"
    view = one.views["attention"]
    ds = catalog.attention("downscaling/weatherpeft-4pct")
    block = one.sel.block
    assert block == "encoder0.0"
    # the bytes shown are those of the wpeft.viz matplotlib figures, titled as they are
    assert view.var_var.object == figure_png(plot_variable_attention(ds, block))
    assert view.var_patch.object == figure_png(plot_patch_attention(ds, block))
    assert view.var_var.alt_text == plot_variable_attention(ds, block).axes[0].get_title()
    assert view.var_patch.alt_text == plot_patch_attention(ds, block).axes[0].get_title()
    assert catalog.images.misses == 2

    two = workbench_factory("dark")  # another session, dark: its own two images
    two.sel.view = "attention"
    dark = two.views["attention"]
    assert dark.var_var.object == themed_png(lambda: plot_variable_attention(ds, block),
                                             theme="dark")
    assert dark.var_var.object != view.var_var.object and catalog.images.misses == 4
    three = workbench_factory()  # a third, light again: nothing rendered
    three.sel.view = "attention"
    assert three.views["attention"].var_var.object is view.var_var.object
    assert catalog.images.misses == 4

    view.prompt.value = 2  # another prompt token: the kernels stay, the map follows
    assert catalog.images.misses == 4 and "prompt 2" in view.prompt_map.object.opts.get().kwargs[
        "title"]
    view.block.value = "decoder2.1"  # another block: two new images
    assert catalog.images.misses == 6
    assert view.var_patch.object == figure_png(plot_patch_attention(ds, "decoder2.1"))


def test_fisher_images_follow_the_page_theme(workbench_factory, catalog) -> None:
    """A dark page gets the images drawn dark (light text on a transparent background), cached
    apart from the light ones; the colour map of the mask is the same in both."""
    import matplotlib.image

    from wpeft.viz.fisher import mask_image_png, overlap_curves_png

    light = workbench_factory()
    light.sel.view = "fisher"
    dark = workbench_factory("dark")
    dark.sel.view = "fisher"
    ds = catalog.fisher("downscaling/weatherpeft-4pct")
    matrix = dark.sel.matrix
    shown = dark.views["fisher"].image.object
    assert shown == mask_image_png(ds, matrix, 30, theme="dark")
    assert shown != light.views["fisher"].image.object
    assert dark.views["fisher"].curves.object == overlap_curves_png(ds, None, None, theme="dark")
    assert catalog.images.misses == 4  # two images per theme

    def rgba(png: bytes):
        return matplotlib.image.imread(io.BytesIO(png))

    on_light, on_dark = rgba(light.views["fisher"].image.object), rgba(shown)
    assert on_light.shape == on_dark.shape and on_light.shape[2] == 4
    assert on_light[0, 0].tolist() == [1.0, 1.0, 1.0, 1.0]  # white corner
    assert on_dark[0, 0, 3] == 0.0  # transparent corner: the page shows through
    # text: dark pixels on the light image, light ones on the dark image
    text_light = (on_light[..., :3].max(-1) < 0.2) & (on_light[..., 3] > 0.9)
    text_dark = (on_dark[..., :3].min(-1) > 0.8) & (on_dark[..., 3] > 0.9)
    assert text_light.sum() > 50 and text_dark.sum() > 50
    # the mask itself (the image's opaque centre) is drawn with the same colours
    h, w = on_light.shape[:2]
    centre = (slice(h // 3, 2 * h // 3), slice(w // 3, w // 2))
    np.testing.assert_array_equal(on_light[centre], on_dark[centre])
    with pytest.raises(DataError, match=r"Unknown theme 'purple': use one of \['dark', 'light'\]"):
        mask_image_png(ds, matrix, 30, theme="purple")


def test_record_images_follow_new_records(workbench_factory, catalog, runs_root) -> None:
    wb = workbench_factory()
    wb.sel.view = "fisher"
    view = wb.views["fisher"]
    before = view.curves.object
    RecordStore(runs_root / "downscaling/weatherpeft-4pct", "fisher").append(
        40, _fisher_steps()[0])  # a mask unlike the last one: the overlap curves change
    assert wb.poll() is True and view.step.value == 40
    assert view.image.alt_text.endswith("mask at step 40")
    assert view.curves.object != before  # rendered again from the new records
    with pytest.raises(DataError, match="no fisher records"):
        catalog.record_png("downscaling/full", "fisher", ("x",), lambda ds: b"")


def test_overview_table_pages_and_fixed_widths(workbench_factory, runs_root) -> None:
    from wpeft.app.workbench import OVERVIEW_PAGE_SIZE, column_widths

    wb = workbench_factory()
    table = wb.views["overview"].table
    assert table.pagination == "local" and table.page_size == OVERVIEW_PAGE_SIZE
    assert set(table.widths) == set(table.value.columns)
    df = pd.DataFrame({"run": ["a", "a" * 50], "x": [1.5, 2.25], "long_column_title": [1, 2]})
    # 8 px a character + 24, clamped to [60, 320]: 50 chars -> 320, "2.25" -> 60, 17 -> 160
    assert column_widths(df) == {"run": 320, "x": 60, "long_column_title": 160}


def test_overview_shows_the_headline_scores_and_the_columns_asked_for(
        workbench_factory, runs_root) -> None:
    """By default the runs table shows the scores of the tasks' headline variables (downscaling:
    T2m, U10, V10, Z500, T850), not every score; the column chooser (mirrored in the URL's
    ``columns``) adds others; the download keeps every score."""
    from wpeft.app.workbench import headline_scores

    path = runs_root / "downscaling/weatherpeft-4pct" / "summary.json"
    summary = json.loads(path.read_text())
    summary["scores"].update({"rmse/temperature_500": 3.5, "rmse_bilinear/geopotential_250": 9.0})
    path.write_text(json.dumps(summary))
    wb = workbench_factory()
    overview = wb.views["overview"]
    scores = ["rmse/2m_temperature", "rmse/temperature_850", "rmse/temperature_500",
              "rmse_bilinear/geopotential_250"]
    assert sorted(overview.columns.options) == sorted(scores)
    assert overview.columns.value == ["rmse/2m_temperature", "rmse/temperature_850"]
    shown = list(overview.table.value.columns)
    assert "rmse/temperature_500" not in shown and "rmse_bilinear/geopotential_250" not in shown
    assert shown[-2:] == ["rmse/2m_temperature", "rmse/temperature_850"]
    assert set(overview.table.widths) == set(shown)
    assert set(scores) <= set(overview.frame().columns)  # the download: every score

    overview.columns.value = ["rmse/temperature_500", "rmse/2m_temperature"]  # the user
    assert wb.sel.columns == "rmse/temperature_500,rmse/2m_temperature"
    table = overview.table.value.set_index("run")
    assert table.loc["downscaling/weatherpeft-4pct", "rmse/temperature_500"] == 3.5
    assert "rmse/temperature_850" not in table.columns
    assert pd.isna(table.loc["downscaling/full", "rmse/temperature_500"])  # not scored there

    other = workbench_factory()  # e.g. from a shared URL; an unknown name is left out
    other.sel.columns = "rmse_bilinear/geopotential_250,nope/x"
    assert other.views["overview"].columns.value == ["rmse_bilinear/geopotential_250"]
    other.sel.columns = "nope/x"  # nothing known: the default again
    assert other.views["overview"].columns.value == ["rmse/2m_temperature",
                                                     "rmse/temperature_850"]
    # by hand: headline variables per task (level-wise names match their base or level)
    assert headline_scores(scores, ["downscaling"]) == scores[:2]
    assert headline_scores(scores, ["precipitation"]) == []
    assert headline_scores(scores, ["unknown-task"]) == scores


def test_warm_up_reads_what_a_new_session_opens_once_for_all(catalog, runs_root,
                                                              caplog) -> None:
    """``wpeft serve`` warms the catalog at start: the runs table and the default run's Fisher
    and attention records are then read from the cache by every session; a record that cannot
    be read does not stop the server, its view reports it."""
    from wpeft.app.workbench import Workbench

    name = "downscaling/weatherpeft-4pct"
    assert catalog.default_run() == name  # the first run with Fisher records
    catalog.warm_up()
    misses, hits = catalog.cache.misses, catalog.cache.hits
    assert misses >= 3  # the table and both kinds of records were read
    assert catalog.fisher(name) is not None and catalog.attention(name) is not None
    assert catalog.cache.misses == misses and catalog.cache.hits == hits + 2
    wb = Workbench(catalog, poll_ms=0, sync_url=False)
    assert wb.sel.run == name

    index = runs_root / name / "records" / "attention" / "index.json"
    index.write_text("{not json")
    catalog.cache.clear()
    with caplog.at_level("INFO", logger="wpeft.app.catalog"):
        catalog.warm_up()  # no exception
    assert "warm-up" in caplog.text and "attention" in caplog.text
    assert catalog.fisher(name) is not None and catalog.cache.hits >= 1
    wb = Workbench(catalog, poll_ms=0, sync_url=False)
    wb.sel.view = "attention"
    assert wb.views["attention"].message.visible  # the view names the problem


def test_the_built_in_tasks_take_their_headline_from_the_torch_free_table(runs_root) -> None:
    """The dashboard reads BUILTIN_HEADLINES without importing the tasks: it must be what the
    registered tasks use, and a workbench that draws its runs table must not load torch (some
    700 MB more in every server process)."""
    from wpeft.data.headline import BUILTIN_HEADLINES
    from wpeft.tasks import TASKS
    from wpeft.tasks.precipitation import TARGET

    assert {name: cls.headline for name, cls in TASKS.items()} == BUILTIN_HEADLINES
    assert all(v.startswith(f"{TARGET}_") for v in BUILTIN_HEADLINES["precipitation"])
    code = ("import sys\n"
            "from wpeft.app.catalog import catalog_for\n"
            "from wpeft.app.workbench import Workbench\n"
            f"wb = Workbench(catalog_for({str(runs_root)!r}), poll_ms=0, sync_url=False)\n"
            "assert wb.views['overview'].columns.value, 'no score columns drawn'\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_log_lets_go_of_the_least_recently_read_files(tmp_path: Path) -> None:
    """Over its line budget the log drops the parsed lines of the files read longest ago (the
    file just read stays, however long); a dropped file is read afresh, with the same result;
    reads of two files run side by side (one lock per file)."""
    import threading

    from wpeft.app.catalog import MetricsLog

    paths = []
    for i, n in enumerate([3, 4, 5]):
        path = tmp_path / f"m{i}.jsonl"
        path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(n)))
        paths.append(path)
    log = MetricsLog(max_lines=9)
    first = log.read(paths[0])
    log.read(paths[1])
    assert len(log) == 2 and log.kept_lines() == 7
    log.read(paths[2])  # 12 > 9: m0, read longest ago, goes
    assert len(log) == 2 and log.kept_lines() == 9
    assert log.read(paths[0]) == first  # read afresh; m1 goes (12 > 9)
    assert log.kept_lines() == 8  # m2 and m0
    log.read(paths[2])  # m2 becomes the most recent, so reading m1 drops m0, not m2
    log.read(paths[1])
    assert log.kept_lines() == 9 and sorted(log._states) == sorted(str(p) for p in paths[1:])
    big = MetricsLog(max_lines=1)
    assert big.read(paths[2])[0] == [{"step": s} for s in range(5)] and big.kept_lines() == 5
    with pytest.raises(ValueError, match="max_lines 0 must be >= 1"):
        MetricsLog(max_lines=0)

    # one file's lock held: another file still reads
    log._locks[str(paths[0])] = held = threading.Lock()
    held.acquire()
    done = threading.Event()
    threading.Thread(target=lambda: (log.read(paths[1]), done.set()), daemon=True).start()
    assert done.wait(10)
    held.release()
