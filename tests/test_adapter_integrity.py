"""Adapter files check themselves: their own checksum, finite values, selection indices in range.

A refused adapter raises a one-line :class:`CheckpointError` and leaves the model untouched.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_backbone import random_batch
from test_methods import pretrained_like, trained_adapter

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.errors import CheckpointError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import load_adapter, state_checksum
from wpeft.methods.base import check_selection

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, batch) -> Path:
    """A selection-method (SFAS) adapter trained for two steps on the tiny backbone."""
    return trained_adapter("sfas", batch, tmp_path_factory.mktemp("adapter") / "sfas", steps=2)


@pytest.fixture(scope="module")
def batch():
    return random_batch(build_backbone("tiny").config, B=1)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    for suffix in (".safetensors", ".json"):
        shutil.copy(saved.with_suffix(suffix), tmp_path / f"a{suffix}")
    return tmp_path / "a.safetensors"


def rewrite(path: Path, change: Callable[[State], None], *, update_checksum: bool) -> None:
    """Change an adapter's tensors in place (the file stays valid safetensors); with
    ``update_checksum``, as if the changed tensors had been saved so."""
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"wpeft": "adapter"})
    if update_checksum:
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta["adapter_checksum"] = state_checksum(state)
        meta_path.write_text(json.dumps(meta))


def selection_name(path: Path) -> str:
    """The first tensor the adapter stores as indices + values."""
    return min(k for k in load_file(str(path)) if k.endswith(".indices")).removesuffix(".indices")


def snapshot(model: torch.nn.Module) -> tuple[State, dict[str, bool], list[str]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [type(m).__name__ for m in model.modules()],
    )


def assert_refused(path: Path, match: str) -> str:
    """Loading ``path`` raises a one-line CheckpointError matching ``match``; the model is
    left as it was. Returns the message."""
    model = pretrained_like()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match) as info:
        load_adapter(path, model)
    message = str(info.value)
    assert "\n" not in message
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    return message


def test_adapter_records_and_verifies_its_own_checksum(saved: Path) -> None:
    meta = json.loads(saved.with_suffix(".json").read_text())
    assert meta["format_version"] == 2
    assert meta["adapter_checksum"] == state_checksum(load_file(str(saved)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(saved, pretrained_like())  # the file as saved: verified, loads quietly


def test_bit_flipped_adapter_is_refused(saved: Path, tmp_path) -> None:
    path = copy_of(saved, tmp_path)
    name = f"{selection_name(path)}.values"

    def flip(state: State) -> None:  # the lowest mantissa bit of every stored value
        state[name] = (state[name].view(torch.int32) ^ 1).view(torch.float32)

    rewrite(path, flip, update_checksum=False)
    message = assert_refused(path, "modified or corrupted since they were saved")
    assert str(path) in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused(saved: Path, tmp_path, bad: float) -> None:
    path = copy_of(saved, tmp_path)
    name = f"{selection_name(path)}.values"

    def poison(state: State) -> None:
        state[name][0] = bad

    rewrite(path, poison, update_checksum=True)  # a diverged run saved it so
    assert_refused(path, rf"non-finite values \(NaN/inf\) in '{name}'")


@pytest.mark.parametrize("where", ["negative", "past_end"])
def test_out_of_range_index_is_refused(saved: Path, tmp_path, where: str) -> None:
    path = copy_of(saved, tmp_path)
    name = selection_name(path)
    numel = dict(pretrained_like().named_parameters())[name.removeprefix("model.")].numel()
    bad = -1 if where == "negative" else numel

    def shift(state: State) -> None:
        state[f"{name}.indices"][-1] = bad

    rewrite(path, shift, update_checksum=True)
    assert_refused(path, rf"index {bad} of '{name}' is out of range \[0, {numel}\)")


def test_load_adapter_state_checks_before_writing(saved: Path) -> None:
    """Direct callers (run resumption) are checked too: nothing is written on refusal."""
    state = load_file(str(saved))
    name = selection_name(saved)
    model = pretrained_like()
    method = create_method("sfas")
    method.apply(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {**state, f"{name}.indices": state[f"{name}.indices"].clone()}
    bad[f"{name}.indices"][0] = 10**9
    with pytest.raises(CheckpointError, match="out of range"):
        method.load_adapter_state(bad)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match="lacks its values"):
        check_selection({f"{name}.indices": state[f"{name}.indices"]}, {name: 10})
    with pytest.raises(CheckpointError, match="expected 1-D integer indices"):
        check_selection(
            {f"{name}.indices": torch.zeros(2), f"{name}.values": torch.zeros(2)}, {name: 10}
        )


def test_adapter_saved_before_checksums_still_loads(saved: Path, tmp_path) -> None:
    path = copy_of(saved, tmp_path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["adapter_checksum"]
    meta_path.write_text(json.dumps({**meta, "format_version": 1}))
    old, new = pretrained_like(), pretrained_like()
    with pytest.warns(UserWarning, match="predates adapter checksums"):
        load_adapter(path, old)
    load_adapter(saved, new)
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
