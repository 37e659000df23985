"""Budget matcher and the trainable counts of the simplest methods, counted independently."""

from __future__ import annotations

import pytest
from torch import nn

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.errors import ConfigError
from wpeft.methods import create_method
from wpeft.methods.budget import match_budget


def tiny():
    return build_backbone("tiny")


@pytest.mark.parametrize("name,target,tolerance", [("lora", 0.04, 0.006), ("sfas", 0.003, 1e-6), ("weatherpeft", 0.04, 1e-6), ("vpt", 0.003, 0.0004)])
def test_match_hits_the_target(name: str, target: float, tolerance: float) -> None:
    m = match_budget(name, target, tiny)
    assert abs(m.achieved - target) <= tolerance, m
    method = create_method(name, **{m.knob: m.value})
    method.apply(tiny())
    assert method.budget_fraction() == pytest.approx(m.achieved)


def test_lora_rank_is_the_nearest_integer() -> None:
    m = match_budget("lora", 0.04, tiny)
    fractions = {}
    for r in (m.value - 1, m.value, m.value + 1):
        method = create_method("lora", rank=r)
        method.apply(tiny())
        fractions[r] = abs(method.budget_fraction() - 0.04)
    assert min(fractions, key=fractions.get) == m.value


def test_fixed_size_methods_report_their_fraction() -> None:
    m = match_budget("bitfit", 0.04, tiny)
    assert m.knob is None and 0 < m.achieved < 0.04


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_out_of_range_budget(bad: float) -> None:
    with pytest.raises(ConfigError, match=f"Budget {bad!r} is out of range"):
        match_budget("lora", bad, tiny)


def test_full_and_bitfit_counts_by_hand() -> None:
    model = tiny()
    full = create_method("full")
    full.apply(model)
    assert full.trainable()["total"] == sum(p.numel() for p in model.parameters())

    model = tiny()
    bitfit = create_method("bitfit")
    bitfit.apply(model)
    biases = sum(
        m.bias.numel()
        for m in model.backbone.modules()
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None
    )
    assert bitfit.trainable() == {
        "backbone": biases, "encoder": 0, "decoder": 0, "head": 0, "added": 0, "total": biases
    }


def test_encoder_decoder_policy_is_counted() -> None:
    model = tiny()
    method = create_method("lora", train_encoder_decoder=True)
    method.apply(model)
    counts = model.num_parameters()
    t = method.trainable()
    assert t["encoder"] == counts["encoder"] and t["decoder"] == counts["decoder"]
    assert method.describe()["method_config"]["train_encoder_decoder"] is True


def test_weatherpeft_is_tadp_plus_sfas() -> None:
    wp, tadp, sfas = (create_method(n) for n in ("weatherpeft", "tadp", "sfas"))
    for m in (wp, tadp, sfas):
        m.apply(tiny())
    t = wp.trainable()
    assert t["added"] == tadp.trainable()["added"]
    assert t["backbone"] == sfas.trainable()["backbone"]
    # the prompt generators are never selection candidates
    eligible = {id(p) for p in wp.model.backbone.parameters()}
    assert not any(id(p) in eligible for p in wp.added.parameters())
