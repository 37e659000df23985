"""The scorecard of runs against a reference (numbers, sign convention, significance, refusals,
the figure, ``wpeft figures``) and the training-loss lines of ``log_every`` in ``metrics.jsonl``.

Scorecard runs are hand-made directories (tests/test_workbench.py's ``make_run``: fields.nc of
6 test times, no training) with the scores rewritten here; only the ``log_every`` test trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from killing import train_killed_during_step
from test_training import config
from test_workbench import make_run

from wpeft.errors import ConfigError
from wpeft.metrics.significance import paired_ttest_ar1
from wpeft.runs import open as open_run
from wpeft.runs.curves import curves_table, train_lines, val_lines
from wpeft.runs.scorecard import SCORECARD_BINS, scorecard
from wpeft.training.loop import TrainConfig, _forget_train_lines, train

T2M, T850 = "2m_temperature", "temperature_850"
REF_SCORES = {
    f"rmse/{T2M}": 2.0, f"rmse/{T850}": 4.0, f"acc/{T2M}": 0.8,
    f"rmse_bilinear/{T2M}": 3.0,  # a reference forecast's score: never on the card
}


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


def card_run(root: Path, name: str, method: str, scores: dict[str, float], *,
             budget: float | None = None, seed: int = 0, fields_seed: int = 0,
             task: str = "downscaling") -> Path:
    """A finished run with these scores; its fields.nc has noise of std 1 + fields_seed and a
    bias of 0.5 * fields_seed (make_run's)."""
    run = make_run(root, name, method, budget=budget, seed=fields_seed, records=False, task=task)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "seed": seed}))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "scores": scores}))
    return run


@pytest.fixture
def three(tmp_path) -> tuple[Path, Path, Path]:
    """Reference (full), a run better in RMSE 2m / ACC and worse in RMSE 850, one worse in all."""
    ref = card_run(tmp_path, "full", "full", REF_SCORES, fields_seed=0)
    good = card_run(tmp_path, "wp", "weatherpeft", {
        f"rmse/{T2M}": 1.5, f"rmse/{T850}": 5.0, f"acc/{T2M}": 0.88, f"rmse_bilinear/{T2M}": 3.0,
    }, budget=0.04, seed=1, fields_seed=0)
    bad = card_run(tmp_path, "lora", "lora", {
        f"rmse/{T2M}": 2.5, f"rmse/{T850}": 4.0, f"acc/{T2M}": 0.6, f"rmse_bilinear/{T2M}": 3.0,
    }, budget=0.04, seed=0, fields_seed=3)
    return ref, good, bad


# --- the numbers ----------------------------------------------------------------------------------


def test_cells_are_relative_differences_by_hand_with_negative_better(three) -> None:
    ref, good, bad = three
    card = scorecard([good, bad], ref)
    assert list(card["run"].values) == ["full default s0", "weatherpeft 4% s1", "lora 4% s0"]
    assert list(card["score"].values) == [f"rmse/{T2M}", f"rmse/{T850}", f"acc/{T2M}"]
    assert card.sizes == {"run": 3, "score": 3}
    assert card["value"].sel(run="weatherpeft 4% s1").values.tolist() == [1.5, 5.0, 0.88]
    # 100 (run - ref) / |ref|: (1.5-2)/2, (5-4)/4, (0.88-0.8)/0.8; (2.5-2)/2, 0, (0.6-0.8)/0.8
    np.testing.assert_allclose(card["relative_difference"].values,
                               [[0, 0, 0], [-25, 25, 10], [25, 0, -25]], atol=1e-9)
    # negative = better for every metric: an ACC gain of 10 % is -10 %, a loss of 25 % is +25 %
    np.testing.assert_allclose(card["oriented_difference"].values,
                               [[0, 0, 0], [-25, 25, -10], [25, 0, 25]], atol=1e-9)
    assert card["better"].values.tolist() == [
        [False, False, False], [True, False, True], [False, False, False]]
    assert card["higher_is_better"].values.tolist() == [False, False, True]
    assert card["level"].values[1] == 850 and card["base_variable"].values[1] == "temperature"
    assert math.isnan(card["level"].values[0]) and np.isnan(card["lead_hours"].values).all()
    assert card.attrs["task"] == "downscaling" and card.attrs["bins"] == list(SCORECARD_BINS)
    assert card.attrs["reference"] == "full default s0"
    assert "negative = better" in card.attrs["sign_convention"]
    # the reference among the runs is listed once; a metric and variable filter
    assert scorecard([ref, good], ref).sizes["run"] == 2
    only = scorecard([good], ref, metrics=["acc"], variables=["2m_temperature"])
    assert list(only["score"].values) == [f"acc/{T2M}"]
    frame = card.to_dataframe()
    assert len(frame) == 9 and "relative_difference" in frame


def test_precipitation_leads_are_parsed() -> None:
    from wpeft.runs.scorecard import _parse_variable

    base, level, lead = _parse_variable("total_precipitation_6hr_12h")
    assert (base, lead) == ("total_precipitation_6hr", 12.0) and math.isnan(level)
    assert _parse_variable("10m_u_component_of_wind")[0] == "10m_u_component_of_wind"


def _domain_mse(fields: xr.Dataset, var: str) -> np.ndarray:
    """Per-time latitude-weighted (cos φ) mean squared error, by hand."""
    e2 = (fields[var] - fields[f"{var}_target"]).values ** 2  # (time, lat, lon)
    w = np.cos(np.deg2rad(fields["latitude"].values))
    return (e2 * w[None, :, None]).sum((1, 2)) / (w.sum() * e2.shape[2])


def test_significance_matches_the_paired_test_called_by_hand(three) -> None:
    ref, good, bad = three
    card = scorecard([good, bad], ref)
    with xr.open_dataset(ref / "fields.nc") as r, xr.open_dataset(bad / "fields.nc") as b:
        a_t2m, r_t2m = _domain_mse(b, T2M), _domain_mse(r, T2M)
        names = {"temperature": T850, "temperature_target": f"{T850}_target"}
        a_850 = _domain_mse(b.sel(level=850).rename(names), T850)
        r_850 = _domain_mse(r.sel(level=850).rename(names), T850)
    p_t2m = float(paired_ttest_ar1(a_t2m, r_t2m).pvalue)
    p_850 = float(paired_ttest_ar1(a_850, r_850).pvalue)
    row = card.sel(run="lora 4% s0")
    assert row["p_value"].values[:2] == pytest.approx([p_t2m, p_850], rel=1e-9)
    assert bool(row["significant"].values[0]) == (p_t2m < 0.05) and p_t2m < 0.05  # 1.5 K bias
    # identical fields: the test is undefined (NaN), not significant; ACC has no per-time loss
    same = card.sel(run="weatherpeft 4% s1")
    assert np.isnan(same["p_value"].values).all() and not same["significant"].values.any()
    assert np.isnan(card["p_value"].sel(score=f"acc/{T2M}").values).all()
    assert not card["significant"].sel(run="full default s0").values.any()
    # a stricter alpha keeps only what passes it
    strict = scorecard([bad], ref, alpha=1e-12)
    expected = np.nan_to_num(strict["p_value"].values, nan=1) < 1e-12
    assert strict["significant"].values.tolist() == expected.tolist()
    # a run without fields: NaN / False, the scores still compared
    (good / "fields.nc").unlink()
    no_fields = scorecard([good], ref)
    assert np.isnan(no_fields["p_value"].values).all()
    assert no_fields["relative_difference"].values[1, 0] == pytest.approx(-25)


def test_refusals_name_the_run(three, tmp_path) -> None:
    ref, good, _ = three
    other = card_run(tmp_path, "pp", "full", REF_SCORES, task="postprocessing")
    with pytest.raises(ConfigError, match=r"pp \(postprocessing\) are of another task.*downsc"):
        scorecard([good, other], ref)
    fewer = card_run(tmp_path, "fewer", "lora", {f"rmse/{T2M}": 1.0, f"acc/{T2M}": 0.9})
    with pytest.raises(ConfigError, match=r"fewer scores other variables.*missing \['temp"):
        scorecard([fewer], ref)
    (good / "summary.json").unlink()
    with pytest.raises(ConfigError, match=r"wp has no summary.json yet"):
        scorecard([good], ref)
    with pytest.raises(ConfigError, match=r"metrics \['bias'\] have no known orientation"):
        scorecard([], ref, metrics=["bias"])
    with pytest.raises(ConfigError, match="alpha must be in"):
        scorecard([], ref, alpha=1.5)


def test_same_labels_fall_back_to_directory_names(tmp_path) -> None:
    ref = card_run(tmp_path, "a", "lora", REF_SCORES)
    twin = card_run(tmp_path, "b", "lora", REF_SCORES)
    assert list(scorecard([twin], ref)["run"].values) == ["a", "b"]


# --- the figure -----------------------------------------------------------------------------------


def test_plot_scorecard_one_cell_per_run_and_score(three) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import QuadMesh
    from matplotlib.figure import Figure

    from wpeft.viz.scorecard import plot_scorecard

    ref, good, bad = three
    card = scorecard([good, bad], ref)
    fig = plot_scorecard(card)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert mesh.get_array().shape == (3, 3)
    texts = list(ax.texts)
    assert len(texts) == 9 and texts[3].get_text() == "1.5"  # run 2, first score
    bold = [t for t in texts if t.get_fontweight() == "bold"]
    assert len(bold) == int(card["significant"].sum()) >= 1
    colours = mesh.to_rgba(mesh.get_array())  # (3, 3, 4)
    blue, red = colours[1, 0], colours[1, 1]  # -25 %: better; +25 %: worse
    assert blue[2] > blue[0] and red[0] > red[2]
    assert colours[1, 2][2] > colours[1, 2][0]  # an ACC gain (-10 %) is blue too
    assert colours[2, 2][0] > colours[2, 2][2]  # an ACC loss (+25 %) red
    label = fig.axes[1].get_ylabel()
    assert "negative / blue = better" in label
    assert "(reference)" in ax.get_yticklabels()[0].get_text()
    assert "full default s0" in ax.get_title()


def test_wpeft_figures_writes_the_scorecard(three, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from wpeft.cli import main

    ref, good, _ = three
    out = tmp_path / "fig"
    assert main(["figures", str(ref), str(good), "--out", str(out), "--dpi", "40"]) == 0
    assert (out / "scorecard.png").stat().st_size > 0


# --- training-loss lines --------------------------------------------------------------------------


def test_forget_train_lines_keeps_validation_and_mends_a_cut_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "split": "train", "loss": 1.0}, {"step": 2, "split": "val", "loss": 2.0},
             {"step": 3, "split": "train", "loss": 3.0}, {"step": 3, "split": "val", "loss": 4.0}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "spl')
    _forget_train_lines(path, after=2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [lines[0], lines[1], lines[3]]
    before = path.stat().st_mtime_ns
    _forget_train_lines(path, after=2)  # nothing to change: the file is left alone
    assert path.stat().st_mtime_ns == before
    _forget_train_lines(tmp_path / "none.jsonl", after=0)  # no file yet: nothing to do


def test_log_every_writes_train_lines_once_even_after_a_resume(tmp_path, monkeypatch) -> None:
    cfg = config(method="lora", steps=4, checkpoint_every=2, eval_every=3, log_every=1)
    run = tmp_path / "killed"
    # killed during step 4: steps 1-3 logged (validation at 3), the checkpoint holds step 2
    train_killed_during_step(monkeypatch, cfg, run, 4, optimizer=torch.optim.AdamW)
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["split"], x["step"]) for x in before] == [
        ("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    train(cfg, run, resume=True, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x["split"] == "train"]
    assert [x["step"] for x in train_rows] == [1, 2, 3, 4]  # step 3 re-done, logged once
    assert set(train_rows[0]) == {"step", "split", "loss"}
    # a resume is exact: the re-done step 3 has the loss it had before the kill
    assert [x["loss"] for x in train_rows[:3]] == [
        x["loss"] for x in before if x["split"] == "train"]
    # validation readers see validation lines only; the train reader the train lines
    opened = open_run(run)
    assert [x["step"] for x in val_lines(opened)] == [3, 4]  # 3 re-evaluated: its last line
    assert [x["step"] for x in train_lines(opened)] == [1, 2, 3, 4]
    curves = curves_table([opened])
    assert list(curves["step"]) == [3, 4] and "split" not in curves
    assert set(opened.metrics["split"]) == {"train", "val"}


def test_log_every_setting_and_cli(tmp_path, monkeypatch) -> None:
    from wpeft.cli import main
    from wpeft.training import loop

    with pytest.raises(ConfigError, match="log_every must be >= 0.*got -1"):
        TrainConfig(log_every=-1, device="cpu")
    seen = {}

    def fake_train(cfg, out, **kw):
        seen["cfg"] = cfg
        return {"trainable": {"total": 1, "head": 0}, "budget_fraction": 0.1, "method": cfg.method,
                "task": cfg.task, "scores": {}}

    monkeypatch.setattr(loop, "train", fake_train)
    assert main(["train", "--device", "cpu", "--log-every", "7", "--quiet",
                 "--out", str(tmp_path / "r")]) == 0
    assert seen["cfg"].log_every == 7
    assert "log_every" in loop.RESUMABLE_CHANGES
