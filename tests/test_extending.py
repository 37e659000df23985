"""docs/ARCHITECTURE.md's checklists are true: a method and a task, each written in a file of its
own as the checklists say (``toy_norm_tuning.py``, ``toy_t2m_task.py``) and registered by
importing it, train through the ordinary loop and CLI with nothing else changed."""

from __future__ import annotations

import json

import importlib
import sys

import pytest
import torch
from safetensors.torch import load_file

from wpeft.backbones.pretrain import load_pretrained
from wpeft.methods import METHODS
from wpeft.methods.adapter_file import load_adapter
from wpeft.tasks import TASKS, create_task
from wpeft.training.loop import TrainConfig, train

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8, "ensemble_members": 3}


@pytest.fixture(autouse=True)
def small_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "world-cache"))


@pytest.fixture(autouse=True)
def toys():
    """Import the toy files (which registers them, as the packages' ``__init__`` imports do) and
    unregister them afterwards, so other tests' loops over the registries do not see them."""
    for module in ("toy_norm_tuning", "toy_t2m_task"):
        sys.modules.pop(module, None)
        importlib.import_module(module)
    yield
    METHODS.pop("toy_norm_tuning", None)
    TASKS.pop("toy_t2m_downscaling", None)


def test_a_toy_method_and_task_train_through_the_loop(tmp_path) -> None:
    assert "toy_norm_tuning" in METHODS and "toy_t2m_downscaling" in TASKS
    cfg = TrainConfig(task="toy_t2m_downscaling", method="toy_norm_tuning", steps=3, batch_size=2,
                      warmup_steps=1, checkpoint_every=0, device="cpu",
                      task_options={"world": WORLD})
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["task"] == "toy_t2m_downscaling" and summary["method"] == "toy_norm_tuning"
    t, c = summary["trainable"], summary["changed"]
    norms = [m for m in load_pretrained("tiny").backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert t["backbone"] == sum(p.numel() for m in norms for p in m.parameters()) > 0
    assert 0 < c["backbone"] <= t["backbone"] and c["encoder"] == c["decoder"] == 0
    assert set(summary["scores"]) >= {"rmse/2m_temperature"}
    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert saved and all("norm" in name or name.startswith("head.") for name in saved), sorted(saved)[:5]

    # the adapter reloads onto a pristine backbone through the registry
    model = load_pretrained("tiny")
    head = create_task("toy_t2m_downscaling", world=WORLD).setup(model)
    method = load_adapter(tmp_path / "run" / "adapter", model, head)
    assert method.name == "toy_norm_tuning"
    params = dict(model.named_parameters())
    for name, value in saved.items():
        if name.startswith("model."):
            assert torch.equal(params[name.removeprefix("model.")], value)


def test_the_toy_task_loss_is_the_normalised_l1_of_2m_temperature() -> None:
    task = create_task("toy_t2m_downscaling", world=WORLD)
    model = load_pretrained("tiny")
    task.setup(model)
    batch = next(task.batches("train", 2, seed=0))
    pred = task.predict(model, batch)
    loss = task.loss(pred, batch)
    t2m = "2m_temperature"
    std = task._require_std()["2t"]  # the backbone's normalisation std of 2 m temperature
    by_hand = (pred[t2m] - batch.targets[t2m]).abs().mean() / std
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert json.dumps(task.describe())  # a task describes itself for the run's records
