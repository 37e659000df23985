"""Task settings from a file (``--data``), task settings on ``compare`` and a backbone from a
local checkpoint (``--checkpoint``): what the runs record, and what a resume refuses."""

from __future__ import annotations

import json

import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

from wpeft.backbones.pretrain import load_pretrained
from wpeft.cli import main
from wpeft.errors import ConfigError
from wpeft.options import check_settings, load_settings_file
from wpeft.tasks.downscaling import DownscalingConfig

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8,
         "ensemble_members": 3}
SMALL = ["--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


@pytest.fixture
def world_yaml(tmp_path):
    """A settings file: the small world (a nested mapping) and two downscaling settings."""
    path = tmp_path / "data.yaml"
    path.write_text(
        "# downscaling on a small world\n"
        f"world: {json.dumps(WORLD)}\n"
        "split_fractions: [0.6, 0.2, 0.2]\n"
        "surface_weight: 0.5\n"
    )
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The shipped tiny backbone's weights saved as a plain safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "tiny-copy.safetensors"
    state = load_pretrained("tiny").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_settings_file_yaml_and_json(tmp_path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text(
        "lr: 1e-3\nstart: 2020-01-01\nregion: [50.0, -10.5]\n"
        "data: {path: x.zarr, variables: [2t]}\n"
    )
    assert load_settings_file(y) == {
        "lr": 1e-3, "start": "2020-01-01", "region": [50.0, -10.5],
        "data": {"path": "x.zarr", "variables": ["2t"]},
    }
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"world": WORLD}))
    assert load_settings_file(j) == {"world": WORLD}
    (tmp_path / "k.yaml").write_text("1: 2\n")
    with pytest.raises(ConfigError, match=r"k.yaml: key 1 under the top level is not text"):
        load_settings_file(tmp_path / "k.yaml")
    (tmp_path / "s.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="the top level is a list, not a mapping"):
        load_settings_file(tmp_path / "s.json")


def test_a_mapping_for_a_dataclass_field_is_checked_and_coerced() -> None:
    settings = {"world": WORLD, "split_fractions": [0.6, 0.2, 0.2]}
    check_settings(DownscalingConfig, settings, "task 'downscaling'")
    cfg = DownscalingConfig(**settings)
    assert cfg.world.nlat == 16 and cfg.split_fractions == (0.6, 0.2, 0.2)
    with pytest.raises(ConfigError, match=r"world: nlat='many' is not a valid int"):
        check_settings(DownscalingConfig, {"world": {"nlat": "many"}}, "task 'downscaling'")


def test_train_takes_task_settings_from_a_file(tmp_path, world_yaml) -> None:
    run = tmp_path / "run"
    argv = ["train", *SMALL, "--checkpoint-every", "0", "--data", str(world_yaml),
            "--task-option", "atmos_weight=0.75", "--out", str(run)]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    task = summary["task_config"]
    assert task["surface_weight"] == 0.5 and task["atmos_weight"] == 0.75
    assert task["split_fractions"] == [0.6, 0.2, 0.2] and task["world"]["nlat"] == 16
    assert summary["backbone_weights"]["source"] == "shipped"
    config = json.loads((run / "config.json").read_text())
    assert config["task_options"]["world"] == WORLD and config["checkpoint"] is None


def test_a_task_option_wins_over_the_file(tmp_path, world_yaml, capsys) -> None:
    # surface_weight=0 with atmos_weight=0 is refused: the option replaced the file's 0.5
    argv = ["train", *SMALL, "--data", str(world_yaml), "--task-option", "surface_weight=0",
            "--task-option", "atmos_weight=0", "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "surface_weight and atmos_weight are both 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_train_from_a_checkpoint_records_it_and_resume_refuses_another(
    tmp_path, world_yaml, tiny_checkpoint, capsys
) -> None:
    weights_file = tmp_path / "weights.safetensors"
    weights_file.write_bytes(tiny_checkpoint.read_bytes())
    run = tmp_path / "run"
    argv = ["train", *SMALL, "--method", "bitfit", "--checkpoint-every", "1",
            "--data", str(world_yaml), "--out", str(run)]
    assert main([*argv, "--checkpoint", str(weights_file)]) == 0
    weights = json.loads((run / "summary.json").read_text())["backbone_weights"]
    assert weights["source"] == "checkpoint" and weights["file"] == str(weights_file)
    assert weights["bytes"] == weights_file.stat().st_size and len(weights["sha256"]) == 64
    assert json.loads((run / "adapter.json").read_text())["backbone_weights"] == weights
    assert json.loads((run / "config.json").read_text())["checkpoint"] == str(weights_file)

    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    assert main([*argv, "--checkpoint", str(weights_file), "--resume"]) == 0  # same weights
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main([*argv, "--checkpoint", str(tiny_checkpoint), "--resume"]) == 2  # another path
    assert "belongs to a run with another config" in capsys.readouterr().err

    state = load_pretrained("tiny").state_dict()  # another file at the run's path
    first = next(iter(state))
    save_file({k: (v + 1 if k == first else v).contiguous() for k, v in state.items()},
              str(weights_file))
    assert main([*argv, "--checkpoint", str(weights_file), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the file changed since the run started" in err and err.count("\n") == 1


def test_compare_applies_task_options_to_every_cell(tmp_path, world_yaml, capsys) -> None:
    root, out = tmp_path / "root", tmp_path / "tables"
    argv = ["compare", "--root", str(root), "--methods", "bitfit", "full", "--budgets",
            "--steps", "2", "--batch-size", "2", "--quiet", "--data", str(world_yaml),
            "--task-option", "surface_weight=0.25", "--task-option", "atmos_weight=0.5",
            "--log-every", "1"]
    assert main([*argv, "--tables", str(out)]) == 0
    cells = sorted(root.glob("downscaling/*/summary.json"))
    assert len(cells) == 2
    for path in cells:  # --log-every reaches every run: its training-loss curve
        lines = [json.loads(x) for x in (path.parent / "metrics.jsonl").read_text().splitlines()]
        assert [(x["split"], x["step"]) for x in lines] == [("train", 1), ("train", 2)]
    for path in cells:
        task = json.loads(path.read_text())["task_config"]
        assert task["surface_weight"] == 0.25 and task["atmos_weight"] == 0.5
        assert task["world"]["nlat"] == 16
    attrs = xr.open_dataset(out / "comparison.nc").attrs
    assert json.loads(attrs["task_config:downscaling"])["atmos_weight"] == 0.5
    assert json.loads(attrs["backbone_weights"])["source"] == "shipped"

    # other settings over the same root: refused before anything runs or is written
    mtimes = [p.stat().st_mtime for p in cells]
    capsys.readouterr()
    assert main([*argv[:-4], "--task-option", "atmos_weight=0.6", *argv[-2:]]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run with other settings (task_options differ)" in err
    assert [p.stat().st_mtime for p in cells] == mtimes
    assert main(argv) == 0  # the same settings: the finished cells are skipped
    assert [p.stat().st_mtime for p in cells] == mtimes


def test_compare_config_keys_options_by_task() -> None:
    from wpeft.training.compare import CompareConfig

    with pytest.raises(ConfigError, match="names task 'precipitation', which is not in tasks"):
        CompareConfig(tasks=("downscaling",), task_options={"precipitation": {}})
    cells = CompareConfig(methods=("lora",), task_options={"downscaling": {"world": WORLD}}).cells()
    assert all(c.task_options == {"world": WORLD} for c in cells)
    with pytest.raises(ConfigError, match=r"has no setting\(s\) \['nosuch'\]"):
        CompareConfig(methods=("lora",), task_options={"downscaling": {"nosuch": 1}}).cells()


def test_the_checkpoint_backbone_uses_auroras_normalisation(tiny_checkpoint) -> None:
    from aurora import normalisation as aurora_norm

    from wpeft.tasks.common import backbone_stats
    from wpeft.training.loop import TrainConfig, load_backbone

    model = load_backbone(TrainConfig(checkpoint=str(tiny_checkpoint)))
    assert model.norm_mean == {} and not model.training
    t850 = (aurora_norm.locations["t_850"], aurora_norm.scales["t_850"])
    assert backbone_stats(model, "t", 850) == t850
    shipped = load_pretrained("tiny")
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_with_other_variables_is_refused_before_a_run_directory(
    tmp_path, world_yaml, capsys
) -> None:
    """Weights of a backbone that embeds another set of variables (here one surface variable
    more) do not fit: refused in one line, and no run directory is left behind."""
    import dataclasses

    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.backbones.configs import get_config

    other = dataclasses.replace(get_config("tiny"), surf_vars=("2t", "10u", "10v", "msl", "tp"))
    path = tmp_path / "other-variables.safetensors"
    state = build_backbone(other).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    run = tmp_path / "run"
    code = main(["train", *SMALL, "--data", str(world_yaml), "--checkpoint", str(path),
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "tp" in err and err.count("\n") == 1
    assert not run.exists()


def test_dry_run_prints_the_budget_match_or_its_refusal(capsys) -> None:
    assert main(["train", "--method", "lora", "--budget", "0.04", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  budget: target 4 %, achieved 4.039 % (rank=7)" in out
    assert main(["train", "--method", "lora", "--budget", "0.003", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "below what 'lora' can reach" in err and "use --budget 0.0058 or more" in err


def test_compare_default_budgets_are_feasible_on_tiny(capsys) -> None:
    from wpeft.cli import build_parser

    args = build_parser().parse_args(["compare", "--root", "r"])
    assert args.budgets == [0.04]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    assert "is refused before any run starts" in " ".join(capsys.readouterr().out.split())
