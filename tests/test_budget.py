"""Budget matcher and the trainable counts of the simplest methods, counted independently."""

from __future__ import annotations

import pytest
from torch import nn

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.cli import main
from wpeft.errors import ConfigError
from wpeft.methods import create_method
from wpeft.methods.budget import BudgetInfeasible, match_budget, readable_bound
from wpeft.training.compare import CompareConfig, compare


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


# --- no clamp: refusals with the smallest feasible budget ---------------------------------------

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}


@pytest.fixture
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


def fraction(name: str, **kwargs) -> float:
    method = create_method(name, **kwargs)
    method.apply(tiny())
    return method.budget_fraction()


@pytest.mark.parametrize("value,up,expected", [
    (0.0374401, True, 0.038), (0.0057718, True, 0.0058), (0.038, True, 0.038),
    (0.0999, True, 0.1), (0.0374401, False, 0.037), (0.99, False, 0.99),
])
def test_readable_bound(value: float, up: bool, expected: float) -> None:
    assert readable_bound(value, up) == expected


def test_lora_below_rank_one_is_refused_with_the_smallest_budget() -> None:
    floor = fraction("lora", rank=1)  # 0.577 % of tiny
    assert 0.0057 < floor < 0.0058  # so the readable smallest budget is 0.0058
    with pytest.raises(BudgetInfeasible, match=rf"rank=1\) it trains {100 * floor:.4g}% of the "
                                               r"backbone; use --budget 0\.0058 or more") as e:
        match_budget("lora", 0.003, tiny)
    assert e.value.smallest == 0.0058 and e.value.largest is None
    m = match_budget("lora", 0.0058, tiny)  # the advised budget is feasible: rank 1, within it
    assert m.value == 1 and m.achieved == pytest.approx(floor) and m.achieved <= 0.0058


def test_weatherpeft_refusal_names_tadp_share_and_the_prompts_that_fit() -> None:
    n = tiny().num_parameters()["backbone"]
    tadp30, tadp29 = fraction("tadp", num_prompts=30), fraction("tadp", num_prompts=29)
    per_prompt = tadp30 - tadp29
    intercept = tadp30 - 30 * per_prompt
    smallest = tadp30 + 1 / n  # TADP plus one SFAS entry
    assert 0.037 < smallest < 0.038
    fits = int((0.02 - 1 / n - intercept) // per_prompt)
    assert fits == 11
    with pytest.raises(BudgetInfeasible) as e:
        match_budget("weatherpeft", 0.02, tiny, num_prompts=30)
    text = str(e.value)
    assert f"alone take {100 * tadp30:.4g}%" in text and "(30 per block)" in text
    assert "use --budget 0.038 or more" in text and "num_prompts=11" in text
    assert e.value.smallest == 0.038
    # the advice holds: 11 prompts fit 2 %, 12 do not
    m = match_budget("weatherpeft", 0.02, tiny, num_prompts=11)
    assert abs(m.achieved - 0.02) <= 1 / n
    with pytest.raises(BudgetInfeasible, match="at most 11 prompts"):
        match_budget("weatherpeft", 0.02, tiny, num_prompts=12)
    # below TADP at one prompt: said so
    with pytest.raises(BudgetInfeasible, match=r"even 1 prompt per block does not fit 0\.3% "
                                               rf"\(TADP at 1 prompt: {100 * (intercept + per_prompt):.4g}%\)"):
        match_budget("weatherpeft", 0.003, tiny, num_prompts=30)


def test_weatherpeft_split_is_tadp_then_sfas() -> None:
    m = match_budget("weatherpeft", 0.04, tiny, num_prompts=30)
    assert set(m.split) == {"tadp", "sfas"}
    assert m.split["tadp"] == pytest.approx(fraction("tadp", num_prompts=30))
    assert m.split["tadp"] + m.split["sfas"] == pytest.approx(m.achieved, abs=1e-15)
    assert m.split["sfas"] * tiny().num_parameters()["backbone"] == pytest.approx(
        m.trainable["backbone"])
    assert abs(m.achieved - 0.04) <= 1e-6
    lora = create_method("lora")
    lora.apply(tiny())
    assert lora.budget_split() is None  # one part
    assert "budget: target 4 %, achieved 4 % (keep_ratio=" in m.describe()


def test_compare_refuses_an_infeasible_matrix_before_any_run(tmp_path, small_cache) -> None:
    cfg = CompareConfig(tasks=("downscaling",), methods=("weatherpeft", "lora", "bitfit"),
                        budgets=(0.003,), steps=1, batch_size=2,
                        task_options={"downscaling": {"world": WORLD}})
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as e:
        compare(cfg, root, progress=False)
    text = str(e.value)
    assert "2 cell(s)" in text and "no run was started" in text
    assert "downscaling / weatherpeft / budget 0.003: smallest feasible budget 0.038" in text
    assert "downscaling / lora / budget 0.003: smallest feasible budget 0.0058" in text
    assert "bitfit" not in text and "--budgets 0.038 or more" in text
    assert not root.exists()


def test_planner_prints_the_refusal(capsys) -> None:
    code = main(["plan", "--backbone", "tiny", "--method", "lora", "--budget", "0.003",
                 "--grid", "32x64", "--levels", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "use --budget 0.0058 or more" in err
    assert "Traceback" not in err and err.count("\n") == 1
