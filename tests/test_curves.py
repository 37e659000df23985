"""Learning curves and the learning-rate choice of ``wpeft compare`` on the validation split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from wpeft.cli import main
from wpeft.data.headline import GLOBAL_HEADLINE
from wpeft.errors import ConfigError, DataError
from wpeft.runs.curves import curves_table, headline_val_score
from wpeft.training import compare as compare_module
from wpeft.training.compare import (
    LR_SELECTION,
    CompareConfig,
    collect,
    compare,
    tables,
    write_tables,
)
from wpeft.training.loop import TrainingDiverged

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}
T2M, Z500, MSLP = "2m_temperature", "geopotential_500", "mean_sea_level_pressure"


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


def matrix(**kw) -> CompareConfig:
    base = {
        "tasks": ("downscaling",), "methods": ("bitfit",), "budgets": (None,), "seeds": (0, 1),
        "steps": 5, "batch_size": 2, "eval_every": 2, "task_options": {"downscaling": {"world": WORLD}},
    }
    return CompareConfig(**{**base, **kw})


def by_hand(line: dict) -> float:
    """Mean over the headline variables of val RMSE / val bilinear RMSE."""
    ratios = [line[f"rmse/{v}"] / line[f"rmse_bilinear/{v}"] for v in GLOBAL_HEADLINE if f"rmse/{v}" in line]
    return sum(ratios) / len(ratios)


def val_lines_of(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "val"]


def test_a_tiny_matrix_records_curves_and_chooses_the_lr_on_validation(tmp_path) -> None:
    cfg = matrix(lrs=(1e-4, 3e-2))
    assert cfg.planned_runs() == 3  # two lrs at seed 0, the chosen one at seed 1
    summaries = compare(cfg, tmp_path, progress=False)
    assert len(summaries) == 3
    task_dir = tmp_path / "downscaling"
    finals = {lr: val_lines_of(task_dir / f"bitfit-default-lr{lr:g}-s0")[-1] for lr in (1e-4, 3e-2)}
    chosen = min(finals, key=lambda lr: by_hand(finals[lr]))
    assert {p.name for p in task_dir.iterdir()} == {
        "bitfit-default-lr0.0001-s0", "bitfit-default-lr0.03-s0", f"bitfit-default-lr{chosen:g}-s1"
    }
    for run in task_dir.iterdir():  # every run recorded its curve: steps 2, 4 and the last (5)
        assert [x["step"] for x in val_lines_of(run)] == [2, 4, 5]
    selection = json.loads((tmp_path / LR_SELECTION).read_text())
    (choice,) = selection["choices"]
    assert choice["lr"] == chosen and choice["basis"] == "rmse / rmse_bilinear"
    for c in choice["candidates"]:
        assert c["step"] == 5 and c["val_score"] == pytest.approx(by_hand(finals[c["lr"]]))

    results = collect(tmp_path)  # only the runs at the chosen lr
    assert results.sizes == {"task": 1, "method": 1, "budget": 1, "seed": 2}
    test_rmse = [json.loads((task_dir / f"bitfit-default-lr{chosen:g}-s{s}" / "summary.json").read_text())
                 ["scores"][f"rmse/{T2M}"] for s in (0, 1)]
    assert list(results[f"rmse:{T2M}"].values.ravel()) == test_rmse
    assert json.loads(results.attrs["lr_selection"])["choices"][0]["lr"] == chosen

    out = tmp_path / "tables"
    written = {p.name for p in write_tables(results, out, runs_root=tmp_path)}
    assert {"lr-selection.md", "downscaling-curves.csv", "downscaling-curves.png"} <= written
    md = (out / "lr-selection.md").read_text()
    assert "| val score lr 0.0001 | val score lr 0.03 | chosen lr |" in md
    assert md.rstrip().endswith(f"| {chosen:g} |")
    csv = (out / "downscaling-curves.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 * 3  # header + three runs x three validation lines

    mtimes = sorted(p.stat().st_mtime for p in task_dir.glob("*/summary.json"))
    assert len(compare(cfg, tmp_path, progress=False)) == 3  # finished: nothing runs again
    assert sorted(p.stat().st_mtime for p in task_dir.glob("*/summary.json")) == mtimes


# --- the choice with made-up runs: the answer is known -----------------------------------------

#: Per lr: headline val RMSE / bilinear RMSE at steps 2 and 4, the non-headline ratio at step 4
#: (it would flip the choice if counted) and the test RMSE (it would pick 1e-2).
MADE_UP = {1e-3: ((0.9, 0.5), 5.0, 3.0), 1e-2: ((0.6, 0.7), 0.1, 1.0)}


def made_up_train(calls: list, fail: set):
    """A stand-in for :func:`train` writing what compare reads; lr 1e-4 diverges, and a (lr,
    seed) in ``fail`` is interrupted once."""

    def fake(cfg, run_dir, *, resume=False, progress=True):
        calls.append((cfg.lr, cfg.seed, resume))
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
        if cfg.lr == 1e-4:
            raise TrainingDiverged("the loss became nan at step 3")
        if (cfg.lr, cfg.seed) in fail:
            fail.discard((cfg.lr, cfg.seed))
            raise KeyboardInterrupt
        (ratios, mslp, test) = MADE_UP[cfg.lr]
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step, r in zip((2, 4), ratios):
                line = {"step": step, "split": "val", "loss": 0.1,
                        f"rmse/{T2M}": 2 * r, f"rmse_bilinear/{T2M}": 2.0,
                        f"rmse/{Z500}": 100 * r, f"rmse_bilinear/{Z500}": 100.0,
                        f"rmse/{MSLP}": mslp * 50, f"rmse_bilinear/{MSLP}": 50.0}
                f.write(json.dumps(line) + "\n")
        summary = {"task": cfg.task, "method": cfg.method, "budget": cfg.budget, "seed": cfg.seed,
                   "budget_fraction": 0.001, "scores": {f"rmse/{T2M}": test + cfg.seed},
                   "task_config": {}, "backbone_weights": None}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    return fake


def test_the_choice_reads_the_last_validation_line_never_the_test_split(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(compare_module, "train", made_up_train(calls, fail={(1e-3, 2)}))
    cfg = matrix(seeds=(0, 1, 2), lrs=(1e-4, 1e-3, 1e-2))
    with pytest.raises(KeyboardInterrupt):  # killed in the last run
        compare(cfg, tmp_path, progress=False)
    assert [(lr, s) for lr, s, _ in calls] == [(1e-4, 0), (1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-3, 2)]
    selection = json.loads((tmp_path / LR_SELECTION).read_text())
    (choice,) = selection["choices"]
    # 1e-3: last line 0.5 (first 0.9); 1e-2: 0.7 (first 0.6); the test RMSE prefers 1e-2
    assert choice["lr"] == 1e-3
    assert [(c["lr"], c["diverged"], c["val_score"]) for c in choice["candidates"]] == [
        (1e-4, True, None), (1e-3, False, pytest.approx(0.5)), (1e-2, False, pytest.approx(0.7))
    ]
    names = sorted(p.name for p in (tmp_path / "downscaling").iterdir())
    assert names == ["bitfit-default-lr0.0001-s0", "bitfit-default-lr0.001-s0",
                     "bitfit-default-lr0.001-s1", "bitfit-default-lr0.001-s2",
                     "bitfit-default-lr0.01-s0"]

    calls.clear()  # resumed: the diverged lr tries again, the interrupted run continues
    assert len(compare(cfg, tmp_path, progress=False)) == 4
    assert calls == [(1e-4, 0, True), (1e-3, 2, True)]
    results = collect(tmp_path)
    assert list(results[f"rmse:{T2M}"].values.ravel()) == [3.0, 4.0, 5.0]  # the 1e-3 runs
    assert "| bitfit | default | 3 |" in tables(results)["downscaling"]
    md = (write_tables(results, tmp_path / "t")[-1]).read_text()
    assert "| downscaling | bitfit | default | diverged | 0.5 | 0.7 | 0.001 |" in md


def test_runs_at_several_lrs_without_a_choice_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(compare_module, "train", made_up_train([], fail=set()))
    compare(matrix(seeds=(0,), lrs=(1e-3, 1e-2)), tmp_path, progress=False)
    (tmp_path / LR_SELECTION).unlink()
    with pytest.raises(DataError, match="both runs of downscaling / bitfit / budget None / seed 0"):
        collect(tmp_path)
    (tmp_path / LR_SELECTION).write_text('{"choices": 3}')
    with pytest.raises(DataError, match="no list of choices"):
        collect(tmp_path)


def test_lr_search_settings_are_checked(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        matrix(lr=1e-3, lrs=(1e-3, 1e-2))
    with pytest.raises(ConfigError, match="eval_every=0 must be >= 1"):
        matrix(eval_every=0, lrs=(1e-3, 1e-2))
    matrix(eval_every=5, lrs=(1e-3, 1e-2))  # only the last step's line: enough to choose by
    with pytest.raises(ConfigError, match="at least two different"):
        matrix(lrs=(1e-3, 1e-3))
    with pytest.raises(ConfigError, match="must be a number > 0"):
        matrix(lrs=(1e-3, -1.0))
    cells = matrix(methods=("bitfit", "lora"), budgets=(0.01, 0.02), lrs=(1e-3, 1e-2)).cells()
    assert {(c.lr, c.seed, c.eval_every) for c in cells} == {(lr, s, 2) for lr in (1e-3, 1e-2) for s in (0, 1)}
    assert matrix(methods=("bitfit", "lora"), budgets=(0.01, 0.02), lrs=(1e-3, 1e-2)).planned_runs() == 3 * 3
    assert all(c.eval_every == 2 for c in matrix().cells())  # without lrs too
    assert compare_module.run_dir(tmp_path, cells[0]).name == "bitfit-default-s0"  # today's names

    argv = ["compare", "--root", str(tmp_path / "r"), "--methods", "bitfit", "--budgets", "--steps", "4",
            "--lrs", "1e-3", "3e-3"]
    assert main(argv) == 2
    assert "eval_every=0 must be >= 1" in capsys.readouterr().err
    assert main([*argv, "--lr", "1e-3", "--eval-every", "2"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_the_demo_runs_log_learning_curves() -> None:
    """``wpeft demo``'s runs write training-loss and validation lines (the workbench's Curves
    view has something to draw after the README's first command)."""
    from wpeft.cli import demo_config

    cfg = demo_config(200, 0.04)
    assert (cfg.log_every, cfg.eval_every) == (5, 40)
    assert {(c.log_every, c.eval_every) for c in cfg.cells()} == {(5, 40)}
    assert {c.method for c in cfg.cells()} == {"weatherpeft", "full", "lora"}
    short = demo_config(3, 0.04)  # a short demo still logs every step
    assert (short.log_every, short.eval_every) == (1, 1)


# --- the table and the figure -----------------------------------------------------------------


def fake_run(root: Path, name: str, method: str, seed: int, lr: float,
             scores: list[tuple[int, float]], budget: float | None = None) -> None:
    d = root / "downscaling" / name
    d.mkdir(parents=True)
    cfg = {"task": "downscaling", "method": method, "budget": budget, "seed": seed, "lr": lr, "steps": 6}
    (d / "config.json").write_text(json.dumps(cfg))
    lines = [{"step": s, "split": "val", "loss": 1.0, f"rmse/{T2M}": 2 * r, f"rmse_bilinear/{T2M}": 2.0}
             for s, r in scores]
    lines.insert(1, {"step": 3, "split": "train", "loss": 9.0})  # not a validation line
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_curves_table_and_learning_curves(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    from wpeft.viz import plot_learning_curves

    fake_run(tmp_path, "lora-s0", "lora", 0, 1e-3, [(2, 0.9), (4, 0.7)])
    fake_run(tmp_path, "lora-s1", "lora", 1, 1e-3, [(2, 0.8), (4, 0.5)])
    fake_run(tmp_path, "full-s0", "full", 0, 3e-4, [(2, 0.6), (4, 0.4), (2, 0.65)])  # 2 again
    (tmp_path / "downscaling" / "empty").mkdir()  # a run without curves adds no row
    (tmp_path / "downscaling" / "empty" / "config.json").write_text('{"task": "downscaling", "method": "ssf"}')

    df = curves_table(tmp_path)
    assert list(df.columns[:7]) == ["task", "method", "budget", "seed", "lr", "step", "val_score"]
    assert f"rmse/{T2M}" in df and "loss" in df
    assert len(df) == 6 and "split" not in df
    full = df[df["method"] == "full"]
    assert list(full["step"]) == [2, 4] and list(full["val_score"]) == pytest.approx([0.65, 0.4])
    assert list(df[df["method"] == "lora"]["lr"]) == [1e-3] * 4 and df["budget"].isna().all()

    fig = plot_learning_curves(tmp_path, log_y=True)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["full default", "lora default"]
    lora = ax.get_lines()[1]
    assert list(lora.get_ydata()) == pytest.approx([0.85, 0.6])  # mean over the two seeds
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # min-max band only where there are several seeds
    assert np.allclose(bands[0].get_paths()[0].vertices[:, 1].min(), 0.5)
    assert ax.get_yscale() == "log"
    fig = plot_learning_curves(df, metric="rmse", variable=T2M)
    assert "RMSE" in fig.axes[0].get_ylabel()
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == pytest.approx([1.3, 0.8])
    with pytest.raises(ConfigError, match="give both"):
        plot_learning_curves(df, metric="rmse")
    with pytest.raises(DataError, match="no 'crps/2m_temperature'"):
        plot_learning_curves(df, metric="crps", variable=T2M)
    with pytest.raises(DataError, match="--eval-every"):
        plot_learning_curves(df.iloc[:0])


def test_headline_val_score_pairs_and_fallback() -> None:
    line = {"crps/2m_temperature": 1.0, "crps_raw/2m_temperature": 4.0,
            "rmse/2m_temperature": 3.0, "rmse_raw/2m_temperature": 3.0, "loss": 0.3}
    assert headline_val_score(line, GLOBAL_HEADLINE) == (0.25, "crps / crps_raw")
    per_level = {"rmse/temperature_850": 1.0, "rmse_bilinear/temperature_850": 2.0}
    assert headline_val_score(per_level, ("temperature",)) == (0.5, "rmse / rmse_bilinear")
    assert headline_val_score({"rmse/x": 1.0, "loss": 0.3}, GLOBAL_HEADLINE) == (0.3, "loss")
    score, basis = headline_val_score({"rmse/x": math.nan, "rmse_bilinear/x": 1.0}, ())
    assert math.isnan(score) and basis == "rmse / rmse_bilinear"
