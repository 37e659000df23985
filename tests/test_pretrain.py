"""Pretraining: loss and skill arithmetic, resumable training, and the shipped backbone's skill."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch
from aurora import Batch, Metadata

from wpeft.backbones.pretrain import load_pretrained, pretrained_card
from wpeft.data.world import WorldConfig
from wpeft.errors import CheckpointError, ConfigError
from wpeft.training.pretrain import (
    PretrainConfig,
    forecast_skill,
    normalised_mse,
    pretrain,
    split_indices,
    world_fields,
)

SMALL_WORLD = WorldConfig(
    nlat=16, nlon=32, days=6, spinup_days=1, ensemble_inits=2, ensemble_members=2
)


def _batch(surf: dict, atmos: dict) -> Batch:
    return Batch(
        surf_vars=surf,
        static_vars={},
        atmos_vars=atmos,
        metadata=Metadata(
            lat=torch.tensor([45.0, -45.0]),
            lon=torch.tensor([0.0, 180.0]),
            time=(datetime.datetime(2000, 1, 1),),
            atmos_levels=(850, 500),
        ),
    )


def test_normalised_mse_by_hand() -> None:
    zeros = torch.zeros(1, 1, 2, 2)
    pred = _batch({"2t": zeros + 2.0}, {"z": torch.zeros(1, 1, 2, 2, 2)})
    target_atmos = torch.zeros(1, 1, 2, 2, 2)
    target_atmos[:, :, 1] = 30.0  # error 30 at 500 hPa only
    target = _batch({"2t": zeros}, {"z": target_atmos})
    std = {"2t": 4.0, "z_850": 1.0, "z_500": 10.0}
    # terms: (2/4)^2 = 0.25; z_850: 0; z_500: (30/10)^2 = 9 -> mean over 3 terms
    assert normalised_mse(pred, target, {}, std).item() == pytest.approx((0.25 + 9.0) / 3)


def test_split_keeps_heldout_apart() -> None:
    train, hold = split_indices(100, 0.2, history=2)
    assert max(train) + 1 < 80 <= min(hold) - 2  # training targets never reach the held-out part
    assert min(train) >= 2 - 1 + 1


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="holdout_fraction"):
        PretrainConfig(holdout_fraction=1.5)
    with pytest.raises(ConfigError, match="steps"):
        PretrainConfig(steps=0)


def test_resume_continues_to_the_same_result(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = PretrainConfig(world=SMALL_WORLD, steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2)
    full = pretrain(cfg, tmp_path / "full", progress=False)

    # Kill a second run during its third optimiser step (after the step-2 checkpoint) ...
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "killed", progress=False)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)

    # ... and resume it: the weights are bit-identical to the uninterrupted run's.
    resumed = pretrain(cfg, tmp_path / "killed", progress=False)
    assert resumed["sha256"] == full["sha256"]
    assert resumed["heldout_skill"] == full["heldout_skill"]


def test_missing_or_tampered_pretrained_backbone(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="wpeft pretrain"):
        pretrained_card("tiny", tmp_path)
    card = pretrained_card("tiny")
    (tmp_path / "tiny.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    (tmp_path / card["weights"]).write_bytes(b"not the weights")
    with pytest.raises(CheckpointError, match="sha256"):
        load_pretrained("tiny", tmp_path)


def test_prithvi_pretrains_ships_and_reloads_equal(tmp_path, monkeypatch) -> None:
    """``prithvi-tiny`` pretrains through the same loop; its weights file is in Prithvi's own key
    names (a valid ``--checkpoint``), and the reloaded backbone forecasts exactly as trained."""
    pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')
    from safetensors.torch import load_file

    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path / "cache"))
    world = WorldConfig(days=6, spinup_days=1, ensemble_inits=2, ensemble_members=2)
    cfg = PretrainConfig(backbone="prithvi-tiny", world=world, steps=2, batch_size=2, warmup_steps=1)
    card = pretrain(cfg, tmp_path / "p", progress=False)
    assert card["backbone"]["family"] == "prithvi-wxc"
    assert card["description"].startswith("Prithvi-WxC (prithvi-tiny config)")
    keys = set(load_file(str(tmp_path / "p" / card["weights"])))
    assert "patch_embedding.proj.weight" in keys and "input_scalers_mu" in keys

    model = load_pretrained("prithvi-tiny", tmp_path / "p")
    assert type(model).__name__ == "WpeftPrithvi" and not model.training
    fields = world_fields(model.config, world, progress=False)
    _, hold = split_indices(len(fields), cfg.holdout_fraction, model.config.max_history_size)
    assert forecast_skill(model, fields, hold) == card["heldout_skill"]
    # The training statistics became Prithvi's input scalers.
    assert model.prithvi.input_scalers_mu.flatten()[0].item() == pytest.approx(card["norm_mean"]["2t"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "prithvi-tiny"])
def test_shipped_backbone_beats_persistence(name: str) -> None:
    """Each shipped backbone is a real pretraining: on held-out world data its 6-hour forecast
    RMSE is below 0.6 x persistence's on average, and below persistence everywhere."""
    if name.startswith("prithvi"):
        pytest.importorskip("PrithviWxC", reason='prithviwxc is not installed (pip install -e ".[prithvi]")')
    card = pretrained_card(name)
    model = load_pretrained(name)
    cfg = PretrainConfig(**{**card["pretrain"], "world": WorldConfig.from_dict(card["pretrain"]["world"])})
    fields = world_fields(model.config, cfg.world, progress=False)
    _, hold = split_indices(len(fields), cfg.holdout_fraction, model.config.max_history_size)
    hold = range(hold.start, hold.stop, max(1, len(hold) // 48))  # a spread-out subset
    skill = forecast_skill(model, fields, hold)
    ratios = np.array([s["ratio"] for s in skill.values()])
    assert ratios.mean() < 0.6, skill
    assert (ratios < 1.0).all(), skill
