"""Invariants every registered method keeps (one shared tester, a row per method).

For each method on the tiny backbone: frozen parameters stay bitwise unchanged over several
optimiser steps, the counts are consistent (trainable vs an independent count, changed within
trainable), and saving the adapter then loading it onto a pristine backbone reproduces outputs.
Then the declared contract: what each method says it can do (selection, preparation, prompt
generators, planner state, strategies, learning rate, documented settings), that no caller
outside ``wpeft.methods`` probes a method instead of asking it, and ``wpeft methods
--help-method``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_backbone import random_batch
from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.backbones.configs import BackboneConfig, get_config
from wpeft.cli import main
from wpeft.data.batch import random_batch as make_random_batch
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import METHODS, PEFTMethod, create_method
from wpeft.methods.adapter_file import load_adapter, save_adapter
from wpeft.methods.base import settings
from wpeft.methods.sfas import EntrySelection

STEPS = 3
#: Every registered method, plus lean SFAS / WeatherPEFT (``+r2``: a mask refresh every 2 steps,
#: so the sampled gradients between refreshes are exercised too).
VARIANTS = sorted(METHODS) + ["sfas+lean", "sfas+lean+r2", "weatherpeft+lean", "fish+lean",
                              "child_tuning_d+lean"]


#: Backbones every variant runs on; Prithvi-WxC needs the optional ``prithvi`` extra.
BACKBONES = [
    "tiny",
    pytest.param(
        "prithvi-tiny",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("PrithviWxC") is None,
            reason='prithviwxc is not installed (pip install -e ".[prithvi]")',
        ),
    ),
]


@functools.cache
def batch_of(backbone: str):
    """One random sample on ``backbone``'s grid, levels and variables."""
    cfg = get_config(backbone)
    if isinstance(cfg, BackboneConfig):
        return random_batch(cfg, B=1)
    return make_random_batch(
        cfg.surf_vars, cfg.static_vars, cfg.atmos_vars, batch_size=1, grid=cfg.grid,
        levels=cfg.levels,
    )


def make(spec: str) -> PEFTMethod:
    """``"sfas+lean+r2"`` -> ``create_method("sfas", lean=True, refresh_every=2)``."""
    name, *flags = spec.split("+")
    kwargs: dict = {}
    for flag in flags:
        kwargs.update({"lean": True} if flag == "lean" else {"refresh_every": int(flag[1:])})
    if name == "child_tuning_d" and kwargs.get("lean"):
        kwargs["dense_update"] = False  # lean updates only the selected entries
    return create_method(name, **kwargs)


def pretrained_like(seed: int = 0, backbone: str = "tiny") -> WpeftAurora:
    """A tiny backbone whose blocks are not identity (random init zeroes the res-post-norms)."""
    model = build_backbone(backbone, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def loss_of(model: WpeftAurora, batch) -> torch.Tensor:
    pred = model(batch)
    return sum(v.pow(2).mean() for v in pred.surf_vars.values()) + sum(
        v.pow(2).mean() for v in pred.atmos_vars.values()
    )


def train(method: PEFTMethod, model: WpeftAurora, batch, steps: int = STEPS) -> None:
    if method.preparation(1, 1) is not None:  # static-mask methods select before training
        method.prepare(lambda: loss_of(model, batch), n_batches=1)
    opt = method.optimizer(lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        method.before_backward(step, steps)
        loss_of(model, batch).backward()
        method.after_backward(step, steps)
        opt.step()


def trained_adapter(name: str, batch, path: Path, steps: int, backbone: str = "tiny") -> Path:
    """Train method ``name`` for ``steps`` on :func:`pretrained_like` and save its adapter."""
    model = pretrained_like(backbone=backbone)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method(name)
    method.apply(model)
    train(method, model, batch, steps=steps)
    return save_adapter(method, reference, path)


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", VARIANTS)
def test_frozen_stays_frozen_and_counts_hold(name: str, backbone: str) -> None:
    batch = batch_of(backbone)
    model = pretrained_like(backbone=backbone)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    pristine = {pname: p for params in model.named_parameter_groups().values() for pname, p in params}
    method = make(name)
    method.apply(model)
    frozen = {pname: p for pname, p in pristine.items() if not p.requires_grad}
    train(method, model, batch)

    # every frozen pristine parameter is bitwise unchanged (names taken before any injection)
    for pname, p in frozen.items():
        assert torch.equal(p, reference[pname]), f"{name}: frozen {pname} moved"

    trainable, changed = method.trainable(), method.changed(reference)
    # independent count of what requires grad (selection methods restrict the backbone further)
    independent = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert trainable["total"] <= independent
    if method.selection is None:  # selection methods count mask entries, not whole tensors
        assert trainable["total"] == independent
    for group in ("encoder", "decoder", "head", "added"):
        assert changed[group] <= trainable[group] or group == "added"
    assert changed["total"] > 0, f"{name} changed nothing in {STEPS} steps"


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", VARIANTS)
def test_adapter_round_trip_reproduces_outputs(name: str, backbone: str, tmp_path) -> None:
    batch = batch_of(backbone)
    model = pretrained_like(backbone=backbone)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(name)
    method.apply(model)
    train(method, model, batch)
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    path = save_adapter(method, reference, tmp_path / name.replace("+", "-"), task="test")

    fresh = pretrained_like(backbone=backbone)
    loaded = load_adapter(path, fresh)
    assert loaded.name == name.split("+")[0]
    fresh.eval()
    with torch.no_grad():
        got = fresh(batch)
    for k in expected.surf_vars:
        assert torch.equal(got.surf_vars[k], expected.surf_vars[k]), k
    for k in expected.atmos_vars:
        assert torch.equal(got.atmos_vars[k], expected.atmos_vars[k]), k


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adapter_refuses_the_wrong_backbone(backbone: str, tmp_path) -> None:
    path = trained_adapter("bitfit", batch_of(backbone), tmp_path / "a", 1, backbone)
    with pytest.raises(CheckpointError, match="expects pristine backbone weights"):
        load_adapter(path, pretrained_like(seed=1, backbone=backbone))
    with pytest.raises(CheckpointError, match="Adapter metadata .* does not exist"):
        load_adapter(tmp_path / "missing", pretrained_like(backbone=backbone))


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        create_method("nope")
    method = create_method("bitfit")
    method.apply(build_backbone("tiny"))
    with pytest.raises(ConfigError, match="already applied"):
        method.apply(build_backbone("tiny"))


# --- the declared contract ------------------------------------------------------------------------

SELECTION = {"sfas", "weatherpeft", "fish", "child_tuning_d"}
PREPARED = {"fish", "child_tuning_d"}
TADP = {"tadp", "weatherpeft"}
PROMPTED = {"tadp": 30, "weatherpeft": 30, "vpt": 10}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_declare_what_they_can_do(name: str) -> None:
    method = create_method(name)
    assert method.selection is None  # nothing is selected before apply
    assert (method.preparation(10, 4) is not None) == (name in PREPARED)
    assert method.num_prompts == PROMPTED.get(name, 0)
    assert method.default_lr == (3e-4 if name == "full" else 1e-3)
    for strategy in ("none", "ddp", "fsdp"):
        method.check_strategy(strategy)  # default configs run under every strategy
    model = build_backbone("tiny")
    method.apply(model)
    assert isinstance(method.selection, EntrySelection) == (name in SELECTION)
    generators = method.prompt_generators
    assert (generators is not None) == (name in TADP)
    if generators is not None:
        assert generators is method.added["tadp"] and len(generators) == len(model.blocks)
        assert all(g.to_prompts.out_features == method.num_prompts for g in generators)
    # TADP takes its prompt count from the task; its adapters record the variables E reads
    task = SimpleNamespace(num_prompts=20)
    assert method.task_settings(task) == ({"num_prompts": 20} if name in TADP else {})
    recorded = method.adapter_metadata()
    assert recorded == (
        {"prompt_variables": [list(v) for v in model.embedding_variables()]} if name in TADP else {}
    )
    total = method.selection.total if method.selection is not None else 0
    expected = {"sfas": 6, "weatherpeft": 6, "fish": 2, "child_tuning_d": 2}.get(name, 0) * total
    assert method.state_bytes() == expected  # (fp32 importance +) mask + union per entry


def test_preparation_default_does_nothing_and_static_masks_need_it(batch) -> None:
    lora = create_method("lora")
    assert lora.prepare(lambda: torch.zeros(())) is None  # called with nothing to do: no-op
    model = pretrained_like()
    fish = create_method("fish", keep_ratio=0.01)
    fish.apply(model)
    masks = fish.prepare(lambda: loss_of(model, batch), n_batches=1)
    assert sum(int(m.sum()) for m in masks) == fish.selection.k


def test_broadcast_masks_is_refused_under_fsdp_only() -> None:
    method = create_method("weatherpeft", broadcast_masks=True)
    method.check_strategy("ddp")
    method.check_strategy("none")
    with pytest.raises(ConfigError, match="broadcast_masks=True.*FSDP"):
        method.check_strategy("fsdp")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_setting_has_help(name: str) -> None:
    config = METHODS[name].Config
    assert [s.name for s in settings(config)] == [f.name for f in dataclasses.fields(config)]
    missing = [s.name for s in settings(config) if len(s.help.strip()) < 10]
    assert not missing, f"{name}: settings without help {missing}"


#: How a caller probes a method instead of asking it (``getattr(method.config, knob)`` reading
#: a declared knob is fine: a variable, not a probed name).
PROBES = re.compile(
    r"""(?:has|get)attr\((?:method|m|self\.method)\s*,"""
    r"""|(?:has|get)attr\((?:method|m)\.config\s*,\s*["']"""
    r"""|["']tadp["']\s+(?:not\s+)?in\b|added\[["']tadp["']\]"""
    r"""|_accumulator|\.injector\b|selects_entries|\.broadcast_masks\b"""
)


def test_no_caller_probes_a_method() -> None:
    package = Path(__file__).resolve().parents[1] / "wpeft"
    hits = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "methods":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PROBES.search(line):
                hits.append(f"{path.relative_to(package.parent)}:{number}: {line.strip()}")
    assert not hits, "ask the method (wpeft.methods.base.PEFTMethod) instead:\n" + "\n".join(hits)


def test_the_probe_pattern_catches_probes() -> None:
    for line in (
        'if hasattr(method, "prepare"):',
        'selection = getattr(m, "selection", None)',
        'getattr(getattr(method, "config", None), "broadcast_masks", False)',
        'if "tadp" in getattr(method, "added", {}):',
        'gens = method.added["tadp"]',
        'per_entry = 2 + (4 if hasattr(m, "_accumulator") else 0)',
        'injector = m.injector',
        'if method.selects_entries:',
    ):
        assert PROBES.search(line), line
    assert not PROBES.search('f"{knob}={getattr(method.config, knob)}"')
    assert not PROBES.search("if method.selection is not None:")


def test_cli_help_method_lists_settings(capsys) -> None:
    assert main(["methods", "--help-method", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora: ")
    for setting in settings(METHODS["lora"].Config):
        assert f"  {setting.name}: {setting.type} = {setting.default!r}\n" in out
    assert "  rank: int = 8\n      Rank r of every update B @ A (the size knob)." in out
    assert "alpha: float | None = None" in out and "targets: tuple[str, ...]" in out
    assert "train_encoder_decoder: bool = False" in out


def test_cli_help_method_unknown_name(capsys) -> None:
    assert main(["methods", "--help-method", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("wpeft: error: Unknown method 'nope'; known methods: ")
    assert all(name in err for name in METHODS)
