"""The memory planner: counts from the meta-device model, hand-checked arithmetic per strategy,
the activation estimate against exact saved-tensor measurements, the strategy choice, errors."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.backbones.configs import get_config
from wpeft.data.batch import random_batch
from wpeft.distributed.activations import (
    estimate_activations,
    measure_saved_bytes,
    model_regions,
    stage_geometry,
)
from wpeft.distributed.inventory import inventory
from wpeft.distributed.plan import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MARGIN,
    PlanRequest,
    add_arguments,
    main,
    parse_grid,
    plan,
)
from wpeft.errors import ConfigError
from wpeft.methods import create_method

LEVELS13 = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def request(**kw) -> PlanRequest:
    base = {"backbone": "tiny", "method": "full", "gpus": 1, "batch": 1, "grid": (32, 64)}
    return PlanRequest(**{**base, **kw})


# --- parameters --------------------------------------------------------------------------


def test_inventory_matches_the_real_model():
    """Meta-device counts equal those of the model built for real."""
    for name in ("full", "lora", "weatherpeft"):
        inv = inventory("tiny", name)
        model = build_backbone("tiny")
        method = create_method(name)
        method.apply(model)
        params = list(method.parameters())
        assert inv.total == sum(p.numel() for p in params)
        assert inv.with_grad == sum(p.numel() for p in params if p.requires_grad)
        assert inv.trainable == method.trainable()["total"]
        assert inv.root_params + sum(b.params for b in inv.blocks) == inv.total


def test_optimizer_and_method_state_bytes():
    full = inventory("tiny", "full")
    assert full.optimizer == "AdamW"
    assert full.with_grad == full.trainable == full.total
    assert full.optimizer_bytes == 8 * full.trainable  # 2 fp32 moments
    lora = inventory("tiny", "lora")
    assert lora.optimizer_bytes == 8 * lora.trainable
    assert lora.method_state_bytes == 0
    wp = inventory("tiny", "weatherpeft")
    backbone = build_backbone("tiny").num_parameters()["backbone"]
    assert wp.optimizer == "MaskedAdamW"
    assert wp.masked == backbone  # dense state over every eligible backbone entry
    assert wp.optimizer_bytes == 12 * wp.masked + 8 * (wp.with_grad - wp.masked)
    assert wp.method_state_bytes == 6 * wp.masked  # fp32 importance + mask + union
    assert wp.prompts == 30 and wp.generators


def test_1p3b_costs_nothing():
    inv = inventory("1.3b", "full")
    assert inv.total == 1_256_300_176  # Aurora 1.3B, as built by aurora.Aurora()
    assert len(inv.blocks) == 48


# --- strategy arithmetic -----------------------------------------------------------------


def test_strategy_terms_by_hand():
    p = plan(request(backbone="small", gpus=4, batch=2, grid=(64, 128)))
    inv = p.inventory
    ddp, fsdp = p.strategy("ddp"), p.strategy("fsdp")
    assert ddp.weights == 4 * inv.total  # fp32 master weights, full replica
    assert ddp.gradients == 4 * inv.with_grad
    assert ddp.optimizer == 8 * inv.total
    assert ddp.buffers == 0  # the gradients are views into DDP's buckets
    assert fsdp.weights == math.ceil(4 * inv.total / 4) + 4 * (
        inv.root_params + 2 * inv.largest_block
    )
    assert fsdp.gradients == math.ceil(4 * inv.with_grad / 4)
    assert fsdp.optimizer == math.ceil(8 * inv.total / 4)
    act = p.activations
    # input batch (2 history steps x (4 surface + 3 static + 5 x 13 atmospheric) channels, raw
    # and normalised) and 2 copies of the prediction (4 + 5 x 13 channels), fp32, per sample
    assert act.batch_io == 2 * 4 * 64 * 128 * (2 * 2 * (7 + 65) + 2 * 69)
    assert ddp.activations == fsdp.activations == act.full + act.batch_io
    assert p.strategy("ddp+ckpt").activations == act.checkpointed + act.batch_io
    assert p.activations.checkpointed < p.activations.full
    assert ddp.peak == max(ddp.forward_backward_peak, ddp.step_peak)
    assert p.usable_bytes == int((80 * GIB - CUDA_CONTEXT_BYTES) * (1 - MARGIN))


def test_activations_scale_with_batch_and_grid():
    inv = inventory("tiny", "full")
    a1 = estimate_activations(inv, (32, 64), 1, 13)
    a2 = estimate_activations(inv, (32, 64), 2, 13)
    assert a2.blocks == 2 * a1.blocks
    assert a2.weight_copies == a1.weight_copies > 0  # batch-independent
    big = estimate_activations(inv, (64, 128), 1, 13)
    assert 3.5 < big.blocks / a1.blocks < 4.5
    fp32 = estimate_activations(inv, (32, 64), 1, 13, precision="fp32")
    assert fp32.weight_copies == 0 and fp32.blocks > a1.blocks


def test_stage_geometry_pads_and_shrinks_windows():
    cfg = inventory("tiny", "full").config  # patch 4, window (2, 4, 8)
    stages = stage_geometry(cfg, (48, 96))
    assert [s.res for s in stages] == [(4, 12, 24), (4, 6, 12), (4, 3, 6)]
    assert stages[1].padded == (4, 8, 16)  # 6 x 12 padded to whole 4 x 8 windows
    # lat / lon windows shrink to the 3 x 6 stage and stop shifting; the 4 levels still shift
    assert stages[2].window == (2, 3, 6) and stages[2].padded == (4, 3, 6) and stages[2].shift
    one_level = stage_geometry(dataclasses.replace(cfg, latent_levels=2), (48, 96))[2]
    assert one_level.window == (2, 3, 6) and not one_level.shift
    assert stage_geometry(cfg, (33, 64))[0].res == (4, 8, 16)  # one extra latitude dropped


# --- estimate vs measurement -------------------------------------------------------------


def _measure(method: str, grid, batch: int, autocast: bool) -> int:
    torch.manual_seed(0)
    model = build_backbone("tiny")
    m = create_method(method)
    m.apply(model)
    model.autocast_backbone = autocast
    cfg = model.config
    b = random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=batch, grid=grid, levels=LEVELS13
    )
    out = measure_saved_bytes(
        model, b, regions=model_regions(model, m.added), exclude=list(m.parameters())
    )
    assert out["total"] == sum(v for k, v in out.items() if k != "total")
    return out["total"]


@pytest.mark.parametrize("method", ["full", "lora", "weatherpeft"])
def test_estimate_matches_measured_saved_bytes(method):
    """Calibrated at 32x64 / 64x128 with 3 and 7 levels; checked at 48x96 with 13 levels
    (padded and shrunk windows). fp32 is exact up to 2 %. bf16 on the CPU keeps LayerNorm in
    bf16 where CUDA runs it in fp32, so the CUDA-policy estimate is an upper bound there."""
    inv = inventory("tiny", method)
    grid = (48, 96)
    measured = _measure(method, grid, 2, autocast=False)
    estimate = estimate_activations(inv, grid, 2, 13, precision="fp32").full
    assert measured == pytest.approx(estimate, rel=0.02)
    measured_bf16 = _measure(method, grid, 2, autocast=True)
    estimate_bf16 = estimate_activations(inv, grid, 2, 13, precision="bf16").full
    assert 0.6 < measured_bf16 / estimate_bf16 < 1.05


# --- choice ------------------------------------------------------------------------------


def test_choice_moves_down_the_list_as_memory_shrinks():
    base = {"backbone": "small", "method": "full", "gpus": 4, "batch": 4, "grid": (128, 256)}
    ref = plan(PlanRequest(**base))
    peaks = {s.label: s.peak for s in ref.strategies}
    order = ["ddp", "fsdp", "ddp+ckpt", "fsdp+ckpt"]
    assert peaks["fsdp"] < peaks["ddp"] and peaks["fsdp+ckpt"] < peaks["ddp+ckpt"]

    def memory_for(peak: int) -> float:  # the card on which ``peak`` just fits
        return (peak / (1 - MARGIN) + CUDA_CONTEXT_BYTES) / GIB * 1.001

    seen = []
    for label in order:
        p = plan(PlanRequest(**base, gpu_memory_gib=memory_for(peaks[label])))
        assert p.choice is not None
        seen.append(order.index(p.choice))
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 3
    tiny = plan(PlanRequest(**base, gpu_memory_gib=memory_for(peaks["fsdp+ckpt"]) * 0.9))
    assert tiny.choice is None and tiny.advice
    forced = plan(PlanRequest(**base, activation_checkpointing=True))
    assert {s.label for s in forced.strategies} == {"ddp+ckpt", "fsdp+ckpt"}
    assert forced.choice == "ddp+ckpt"


def test_selection_methods_shard_their_state_under_fsdp():
    p = plan(request(backbone="small", method="weatherpeft", gpus=8, batch=2, grid=(64, 128)))
    ddp = p.strategy("ddp")
    fsdp = p.strategy("fsdp")
    # importance + mask + union (6 bytes per entry) and the masked AdamW state split 8 ways
    assert fsdp.method_state == -(-ddp.method_state // 8)
    assert fsdp.optimizer == -(-ddp.optimizer // 8)
    assert "gather the full mask" in fsdp.note and not ddp.note
    assert p.choice == "ddp"
    assert any("dense state" in a for a in p.advice)


def test_one_gpu_plans_without_ddp_or_fsdp():
    p = plan(request())
    assert [s.label for s in p.strategies] == ["none", "none+ckpt"]
    assert p.strategy("none").buffers == 0 and p.choice == "none"


# --- errors and CLI ----------------------------------------------------------------------


def test_bad_requests_name_the_value():
    with pytest.raises(ConfigError, match="HxW"):
        parse_grid("128by256")
    with pytest.raises(ConfigError, match="HxW"):
        parse_grid("12x")
    with pytest.raises(ConfigError, match="positive"):
        parse_grid("0x64")
    assert parse_grid("721X1440") == (721, 1440)
    with pytest.raises(ConfigError, match="patch size 4"):
        request(grid=(34, 64))  # 2 latitudes too many
    with pytest.raises(ConfigError, match="patch size 4"):
        request(grid=(32, 66))
    request(grid=(33, 64))  # one extra latitude is dropped, as Aurora does (721 -> 720)
    with pytest.raises(ConfigError, match="Unknown backbone 'huge'"):
        request(backbone="huge")
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        request(method="nope")
    with pytest.raises(ConfigError, match="gpus must be an integer >= 1, got 0"):
        request(gpus=0)
    with pytest.raises(ConfigError, match="batch"):
        request(batch=0)
    with pytest.raises(ConfigError, match="precision"):
        request(precision="fp8")
    with pytest.raises(ConfigError, match="budget"):
        request(budget=2.0)


def _args(*argv: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_prints_table_and_json(capsys):
    assert (
        main(
            _args(
                "--backbone",
                "tiny",
                "--method",
                "lora",
                "--gpus",
                "2",
                "--batch",
                "3",
                "--grid",
                "32x64",
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| GiB per GPU | ddp | fsdp | ddp+ckpt | fsdp+ckpt |" in out
    assert "Choice: ddp" in out and "global 6" in out
    assert main(_args("--backbone", "tiny", "--grid", "32x64", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["choice"] == "none" and data["parameters"]["total"] > 0
    # nothing fits 2 GiB: exit 1 with advice
    assert (
        main(
            _args(
                "--backbone", "small", "--method", "full", "--grid", "721x1440", "--gpu-memory", "2"
            )
        )
        == 1
    )
    assert "Choice: none fits." in capsys.readouterr().out
    with pytest.raises(ConfigError, match="HxW"):
        main(_args("--grid", "128"))


def test_budget_matches_the_knob():
    p = plan(request(method="lora", budget=0.04))
    assert p.inventory.budget is not None and p.inventory.budget["knob"] == "rank"
    assert p.inventory.budget["achieved"] == pytest.approx(0.04, rel=0.3)


@pytest.mark.slow
def test_bench_gpu_smoke_on_cpu(tmp_path):
    """benchmarks/bench_gpu.py runs end to end on the CPU (one step, tiny)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gpu

    out = tmp_path / "bench.md"
    assert (
        bench_gpu.main(
            [
                "--device",
                "cpu",
                "--backbones",
                "tiny",
                "--methods",
                "full",
                "weatherpeft",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--out",
                str(out),
            ],
            log=lambda s: None,
        )
        == 0
    )
    text = out.read_text()
    assert text.count("| tiny |") == 2 and "| ok |" in text
    rows = json.loads(out.with_suffix(".json").read_text())
    assert all(r["status"] == "ok" and r["flops"] > 0 and r["planned_bytes"] > 0 for r in rows)


# --- Prithvi-WxC -------------------------------------------------------------------------

needs_prithvi = pytest.mark.skipif(
    importlib.util.find_spec("PrithviWxC") is None,
    reason='prithviwxc is not installed (pip install -e ".[prithvi]")',
)


def _prithvi_measure(method: str, batch: int, bf16: bool) -> int:
    """Exact saved bytes of one prithvi-tiny forward (bf16: CPU autocast over all of it)."""
    torch.manual_seed(0)
    model = build_backbone("prithvi-tiny")
    m = create_method(method)
    m.apply(model)
    cfg = model.config
    b = random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=batch, grid=cfg.grid,
        levels=cfg.levels,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = measure_saved_bytes(
            model, b, regions=model_regions(model, m.added), exclude=list(m.parameters())
        )
    return out["total"]


@needs_prithvi
def test_prithvi_inventory_matches_the_real_model():
    for name in ("full", "lora", "weatherpeft"):
        inv = inventory("prithvi-tiny", name)
        model = build_backbone("prithvi-tiny")
        method = create_method(name)
        method.apply(model)
        params = list(method.parameters())
        assert inv.total == sum(p.numel() for p in params)
        assert inv.with_grad == sum(p.numel() for p in params if p.requires_grad)
        assert inv.trainable == method.trainable()["total"]
        assert inv.root_params + sum(b.params for b in inv.blocks) == inv.total
        assert len(inv.blocks) == 8 and inv.merges == ()  # 2 x 2 + 1 and 2 x 1 + 1
    lora = inventory("prithvi-tiny", "lora")
    assert all(b.qkv.adapter and not b.qkv.own and not b.modulation1 for b in lora.blocks)
    assert not lora.encoder_trainable and not lora.decoder_trainable


@needs_prithvi
def test_prithvi_2p3b_costs_nothing():
    """The released architecture is counted on the meta device: 30 blocks of 12 D^2 + 9 D."""
    d = 2560
    inv = inventory("prithvi-2.3b", "full")
    with torch.device("meta"):
        model = build_backbone("prithvi-2.3b")
    assert inv.total == model.num_parameters()["total"]
    assert len(inv.blocks) == 30 and {b.params for b in inv.blocks} == {12 * d * d + 9 * d}
    wp = inventory("prithvi-2.3b", "weatherpeft")
    assert wp.prompts == 30 and wp.kernel_shape == (d, 160, 2, 2, 2)
    assert wp.masked == model.num_parameters()["backbone"]  # dense state over the blocks


def test_prithvi_geometry_local_and_global():
    """prithvi-2.3b at 360 x 576, patches 2 x 2: 180 x 288 tokens in 12 x 18 mask units of
    15 x 16 tokens; local attention: 216 sequences of 240 tokens, global: 240 of 216."""
    cfg = get_config("prithvi-2.3b")
    local, across = stage_geometry(cfg, (360, 576))
    assert local.res == across.res == (1, 180, 288) and local.tokens == 180 * 288
    assert (local.windows, local.window_tokens) == (12 * 18, 15 * 16)
    assert (across.windows, across.window_tokens) == (15 * 16, 12 * 18)
    assert not local.shift and not across.shift and local.padded == local.res


@needs_prithvi
def test_prithvi_activations_by_hand():
    """prithvi-tiny, full, fp32, one sample: D = 192, 6 heads, MLP 4 D, N = 8 x 16 = 128 tokens
    (16 units of 8), no prompts, so every block attends over N tokens whatever its pattern."""
    inv = inventory("prithvi-tiny", "full")
    d, h, n = 192, 6, 128
    attention = n * (5 * 4 * d + 4 * h)  # q, k, v, output, qkv input (fp32); log-sum-exp
    per_token = 2 * (4 * d + 8) + 4 * 4 * d + 4 * d + 4 * 4 * d  # 2 LN, GELU in, fc1/fc2 in
    act = estimate_activations(inv, (32, 64), 1, 13, precision="fp32")
    assert act.blocks == 8 * (attention + n * per_token) and act.merges == 0
    # the unit-grid gather and unembed save a token grid each; the embeddings their inputs
    # (2 steps x 19 channels + 7 static) and the token / mask-token gathers theirs
    assert act.decoder == 2 * 4 * n * d
    assert act.encoder == 4 * (32 * 64 * (2 * 19 + 7) + 2 * n * d)
    assert act.block_inputs == 8 * 4 * n * d and act.weight_copies == 0
    # WeatherPEFT's 30 prompts join every sequence: 16 units x (8 + 30), 8 positions x (16 + 30)
    wp = estimate_activations(inventory("prithvi-tiny", "weatherpeft"), (32, 64), 1, 13, "fp32")
    local, across = 16 * (8 + 30) * (5 * 4 * d + 4 * h), 8 * (16 + 30) * (5 * 4 * d + 4 * h)
    assert wp.blocks == 5 * local + 3 * across + 8 * n * per_token
    assert wp.method > 0 and wp.encoder == 0


@needs_prithvi
@pytest.mark.parametrize("method", ["full", "lora", "weatherpeft"])
def test_prithvi_estimate_matches_measured_saved_bytes(method):
    """As for Aurora: fp32 exact up to 2 % (LoRA: the first block's LayerNorm input is not
    saved when nothing before it trains, 0.8 %); bf16 on the CPU below the CUDA policy."""
    inv = inventory("prithvi-tiny", method)
    measured = _prithvi_measure(method, 2, bf16=False)
    assert measured == pytest.approx(
        estimate_activations(inv, (32, 64), 2, 13, precision="fp32").full, rel=0.02
    )
    measured_bf16 = _prithvi_measure(method, 2, bf16=True)
    estimate_bf16 = estimate_activations(inv, (32, 64), 2, 13, precision="bf16").full
    assert 0.6 < measured_bf16 / estimate_bf16 < 1.05


@needs_prithvi
def test_prithvi_2p3b_plan_needs_checkpointing_and_sharding(capsys):
    """weatherpeft on Prithvi-WxC 2.3B at 360 x 576: one 80 GB GPU holds neither the full
    activations nor, with checkpointing, the dense MaskedAdamW state on top; two GPUs under
    FSDP2 with checkpointing do."""
    argv = ["--backbone", "prithvi-2.3b", "--method", "weatherpeft", "--grid", "360x576"]
    assert main(_args(*argv, "--gpus", "1", "--gpu-memory", "80")) == 1
    out = capsys.readouterr().out
    assert "14 (fixed) levels" in out and "12x18 mask units of 15x16" in out
    assert "Choice: none fits." in out and "With 2 GPUs, fsdp+ckpt fits" in out
    one = plan(PlanRequest("prithvi-2.3b", "weatherpeft", 1, 1, (360, 576)))
    assert one.strategy("none+ckpt").activations < one.strategy("none").activations / 5
    two = plan(PlanRequest("prithvi-2.3b", "weatherpeft", 2, 1, (360, 576)))
    assert two.choice == "fsdp+ckpt"
    assert main(_args("--backbone", "prithvi-2.3b", "--method", "lora", "--json")) in (0, 1)
    assert json.loads(capsys.readouterr().out)["request"]["grid"] == [360, 576]  # its own grid


def test_prithvi_grid_must_divide_into_mask_units():
    with pytest.raises(ConfigError, match=r"mask unit 30x32 .*e\.g\. 360x576"):
        request(backbone="prithvi-2.3b", grid=(361, 576))
    with pytest.raises(ConfigError, match="mask unit 30x32"):
        request(backbone="prithvi-2.3b", grid=(360, 580))
    with pytest.raises(ConfigError, match="mask unit 8x16"):
        request(backbone="prithvi-tiny", grid=(36, 64))
    with pytest.raises(ConfigError, match=r"Unknown backbone 'prithvi'.*'prithvi-2\.3b'"):
        request(backbone="prithvi")
