"""``wpeft figures``: the figure set of real (short) runs renders headless."""

from __future__ import annotations

import pytest

from wpeft.cli import main
from wpeft.training.loop import TrainConfig, train

pytest.importorskip("matplotlib")
WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}


def test_figure_set_of_two_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(
        task="downscaling", steps=4, batch_size=2, warmup_steps=1, checkpoint_every=0,
        task_options={"world": WORLD}, device="cpu", record_every=2, eval_every=2,
    )
    a, b = tmp_path / "weatherpeft", tmp_path / "full"
    train(TrainConfig(method="weatherpeft", method_options={"num_prompts": 3}, **common), a, progress=False)
    train(TrainConfig(method="full", **common), b, progress=False)
    assert main(["figures", str(a), str(b), "--out", str(tmp_path / "fig"), "--dpi", "60"]) == 0
    names = {p.stem for p in (tmp_path / "fig").glob("*.png")}
    assert {"weatherpeft-fisher-density", "weatherpeft-fisher-overlap"} <= names
    assert any(n.startswith("weatherpeft-attention-") and n.endswith("-variables") for n in names)
    assert "weatherpeft-rmse-2m_temperature" in names and "full-rmse-temperature_850" in names
    assert "downscaling-weatherpeft-vs-full-2m_temperature" in names
    assert "downscaling-budget-vs-skill" in names
    assert "downscaling-learning-curves" in names  # eval_every: validation lines at step 2
    assert not any(n.startswith("full-fisher") for n in names)  # Full-Tuning selects nothing
