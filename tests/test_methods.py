"""Invariants every registered method keeps (one shared tester, a row per method).

For each method on the tiny backbone: frozen parameters stay bitwise unchanged over several
optimiser steps, the counts are consistent (trainable vs an independent count, changed within
trainable), and saving the adapter then loading it onto a pristine backbone reproduces outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_backbone import random_batch
from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import METHODS, PEFTMethod, create_method
from wpeft.methods.adapter_file import load_adapter, save_adapter

STEPS = 3


def pretrained_like(seed: int = 0) -> WpeftAurora:
    """A tiny backbone whose blocks are not identity (random init zeroes the res-post-norms)."""
    model = build_backbone("tiny", seed=seed)
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
    if hasattr(method, "prepare"):  # static-mask methods select before training
        method.prepare(lambda: loss_of(model, batch), n_batches=1)
    opt = method.optimizer(lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        method.after_backward(step, steps)
        opt.step()


def trained_adapter(name: str, batch, path: Path, steps: int) -> Path:
    """Train method ``name`` for ``steps`` on :func:`pretrained_like` and save its adapter."""
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method(name)
    method.apply(model)
    train(method, model, batch, steps=steps)
    return save_adapter(method, reference, path)


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_frozen_stays_frozen_and_counts_hold(name: str, batch) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    pristine = {pname: p for params in model.named_parameter_groups().values() for pname, p in params}
    method = create_method(name)
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
    if not getattr(method, "selects_entries", False):
        assert trainable["total"] == independent
    for group in ("encoder", "decoder", "head", "added"):
        assert changed[group] <= trainable[group] or group == "added"
    assert changed["total"] > 0, f"{name} changed nothing in {STEPS} steps"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapter_round_trip_reproduces_outputs(name: str, batch, tmp_path) -> None:
    model = pretrained_like()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method(name)
    method.apply(model)
    train(method, model, batch)
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    path = save_adapter(method, reference, tmp_path / name, task="test")

    fresh = pretrained_like()
    loaded = load_adapter(path, fresh)
    assert loaded.name == name
    fresh.eval()
    with torch.no_grad():
        got = fresh(batch)
    for k in expected.surf_vars:
        assert torch.equal(got.surf_vars[k], expected.surf_vars[k]), k
    for k in expected.atmos_vars:
        assert torch.equal(got.atmos_vars[k], expected.atmos_vars[k]), k


def test_adapter_refuses_the_wrong_backbone(batch, tmp_path) -> None:
    path = trained_adapter("bitfit", batch, tmp_path / "a", steps=1)
    with pytest.raises(CheckpointError, match="expects pristine backbone weights"):
        load_adapter(path, pretrained_like(seed=1))
    with pytest.raises(CheckpointError, match="Adapter metadata .* does not exist"):
        load_adapter(tmp_path / "missing", pretrained_like())


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        create_method("nope")
    method = create_method("bitfit")
    method.apply(build_backbone("tiny"))
    with pytest.raises(ConfigError, match="already applied"):
        method.apply(build_backbone("tiny"))
