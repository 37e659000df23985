"""The paper's recipes: each starts with one command and the paths of a user's data.

Each recipe is run scaled down (``--backbone tiny --steps 2`` and periods that fit the fixture)
through the CLI on stores written in the real on-disk layouts from the embedded world
(:func:`wpeft.data.layouts.write_layout`): downscaling on two WeatherBench (v1) folders,
post-processing on an ENS-10 folder with a WeatherBench2 truth store, precipitation on an
hourly ARCO-ERA5 store. Everything else the run uses comes from the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wpeft.cli import main
from wpeft.data.layouts import write_layout
from wpeft.data.world import open_world, open_world_ensemble
from wpeft.errors import ConfigError
from wpeft.recipes import RECIPES, get_recipe

# the recipes' 0.3 % is for 1.3b: on tiny TADP alone is 2-3.7 %, so 0.3 % would be refused
SMALL_RUN = ["--backbone", "tiny", "--budget", "0.04", "--steps", "2", "--batch-size", "2",
             "--checkpoint-every", "2", "--device", "cpu", "--quiet"]


def opt(key: str, value: object) -> list[str]:
    return ["--task-option", f"{key}={json.dumps(value)}"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("recipes")
    fine = open_world(progress=False).isel(time=slice(0, 40)).load()
    long = open_world(progress=False).isel(time=slice(0, 60)).load()  # 15 days: 48-h samples
    coarse = open_world(resolution="coarse", progress=False).isel(time=slice(0, 40)).load()
    ens = open_world_ensemble(progress=False).isel(time=slice(0, 12)).load()
    world = open_world(progress=False)
    truth = world.sel(time=slice(ens["init_time"].values[0], ens["time"].values[-1])).load()
    paths = {
        "fine": write_layout(fine, "wb1", root / "wb1-fine"),
        "coarse": write_layout(coarse, "wb1", root / "wb1-coarse"),
        "ens10": write_layout(ens, "ens10", root / "ens10"),
        "truth": write_layout(truth, "wb2", root / "era5.zarr"),
        "arco": write_layout(long, "arco", root / "arco.zarr"),
    }
    return {k: str(v) for k, v in paths.items()}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_downscaling_recipe_on_weatherbench_folders(stores, tmp_path) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--recipe", "paper-downscaling", "--data-path", stores["fine"],
        "--coarse-path", stores["coarse"], *SMALL_RUN, "--out", str(run),
        *opt("data.levels", [850, 500, 250]),
        *opt("data.train", ["2000-01-01", "2000-01-06"]),
        *opt("data.val", ["2000-01-07", "2000-01-08"]),
        *opt("data.test", ["2000-01-09", "2000-01-10"]),
    ])
    assert code == 0
    s, cfg = summary(run), json.loads((run / "config.json").read_text())
    recipe = get_recipe("paper-downscaling")
    data = cfg["task_options"]["data"]
    # the recipe's variables, loss weights and prompt count; the user's paths and periods
    assert data["variables"] == recipe.task_options["data"]["variables"]
    assert data["path"] == stores["fine"] and cfg["task_options"]["coarse_path"] == stores["coarse"]
    assert data["train"] == ["2000-01-01", "2000-01-06"] and data["time_step_hours"] == 6
    assert cfg["method_options"]["num_prompts"] == 30 and cfg["budget"] == 0.04  # overridden
    assert s["budget_match"]["achieved"] == pytest.approx(0.04, abs=1e-6)
    assert s["data"]["grid"] == [32, 64] and s["data"]["coarse_grid"] == [8, 16]
    assert "rmse/2m_temperature" in s["scores"]


def test_postprocessing_recipe_on_an_ens10_folder(stores, tmp_path) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--recipe", "paper-postprocessing", "--data-path", stores["ens10"],
        "--truth-path", stores["truth"], *SMALL_RUN, "--out", str(run),
        *opt("data.statics", stores["truth"]),
        *opt("data.region", [-36.0, 36.0, 0.0, 174.375]),
        *opt("data.train", ["2000-01-01", "2000-02-02"]),
        *opt("data.val", ["2000-02-03", "2000-02-14"]),
        *opt("data.test", ["2000-02-15", "2000-02-25"]),
    ])
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task_options"]["lead_hours"] == 48 and cfg["method_options"]["num_prompts"] == 5
    assert cfg["task_options"]["data"]["levels"] == [500, 850]
    scores = summary(run)["scores"]
    assert any(k.startswith("crps/temperature_850") for k in scores), sorted(scores)


def test_precipitation_recipe_on_an_hourly_arco_store(stores, tmp_path) -> None:
    run = tmp_path / "run"
    code = main([
        "train", "--recipe", "paper-precipitation", "--data-path", stores["arco"],
        *SMALL_RUN, "--out", str(run),
        *opt("data.region", [25.0, 87.5, 236.0, 321.0]),
        *opt("data.train", ["2000-01-01", "2000-01-07"]),
        *opt("data.val", ["2000-01-08", "2000-01-10"]),
        *opt("data.test", ["2000-01-11", "2000-01-15"]),
    ])
    assert code == 0
    s, cfg = summary(run), json.loads((run / "config.json").read_text())
    assert cfg["task_options"]["leads_hours"] == [12, 24, 36]
    assert cfg["method_options"]["num_prompts"] == 20
    assert "seeps/total_precipitation_6hr_12h" in s["scores"]


def test_a_recipe_dry_run_prints_what_it_would_train(capsys, tmp_path) -> None:
    ckpt = tmp_path / "aurora.ckpt"
    ckpt.write_bytes(b"")  # the dry run checks the file exists, it does not read it
    code = main(["train", "--recipe", "paper-precipitation", "--data-path", "era5.zarr",
                 "--checkpoint", str(ckpt), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recipe paper-precipitation" in out and "1.3b" in out
    assert '"region": [15.25, 75.0, 70.0, 129.75]' in out and '"num_prompts": 20' in out
    # the recipe's 0.3 % is feasible on 1.3b (TADP at 20 prompts is 0.11 %): matched on meta
    assert "budget: target 0.3 %, achieved 0.3 % (keep_ratio=" in out and "= tadp 0.1093 %" in out


def test_recipe_overrides_merge_into_nested_settings() -> None:
    recipe = get_recipe("paper-downscaling")
    options = recipe.train_options(
        {"data": "fine.zarr", "coarse": "coarse.zarr"},
        task_options={"data": {"train": ["1990-01-01", "2010-12-31"]}, "surface_weight": 0.5},
        steps=3,
    )
    data = options["task_options"]["data"]
    assert data["train"] == ["1990-01-01", "2010-12-31"]
    assert data["levels"] == recipe.task_options["data"]["levels"]  # kept
    assert data["path"] == "fine.zarr" and options["task_options"]["surface_weight"] == 0.5
    assert options["steps"] == 3 and options["backbone"] == "1.3b"
    assert "path" not in recipe.task_options["data"]  # the recipe itself is unchanged


def test_recipes_are_consistent_with_their_tasks() -> None:
    """Every recipe's settings are accepted by its task's config (with a path filled in)."""
    from wpeft.tasks import TASKS

    for recipe in RECIPES.values():
        paths = {name: f"/data/{name}" for name in recipe.paths}
        options = recipe.train_options(paths)
        TASKS[recipe.task].Config(**options["task_options"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipe", "paper-downscaling"], "--data-path"),
        (["--recipe", "nosuch", "--data-path", "x"], "Unknown recipe 'nosuch'"),
        (["--coarse-path", "x.zarr"], "belongs to a recipe"),
    ],
)
def test_bad_recipe_use_is_one_line(argv, message, capsys, tmp_path) -> None:
    code = main(["train", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_recipe_path_without_its_recipe_is_refused_by_the_recipe() -> None:
    with pytest.raises(ConfigError, match=r"takes paths \['data'\]"):
        get_recipe("paper-precipitation").train_options({"data": "a", "truth": "b"})


def test_world_arguments_still_default_without_a_recipe(tmp_path, capsys) -> None:
    assert main(["train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "downscaling / weatherpeft on the tiny backbone" in out



def test_a_store_the_recipe_cannot_use_leaves_no_run_directory(stores, tmp_path, capsys) -> None:
    """The ARCO store has no ensemble members: post-processing refuses it in one line while
    reading the data, before the run directory is made (``wpeft serve`` shows nothing)."""
    run = tmp_path / "run"
    code = main([
        "train", "--recipe", "paper-postprocessing", "--data-path", stores["arco"],
        "--truth-path", stores["truth"], *SMALL_RUN, "--out", str(run),
        *opt("data.train", ["2000-01-01", "2000-01-07"]),
        *opt("data.val", ["2000-01-08", "2000-01-10"]),
        *opt("data.test", ["2000-01-11", "2000-01-15"]),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "member" in err and err.count("\n") == 1
    assert not run.exists()
