"""Adapter files check themselves: their own checksum, finite values, selection indices in range.

A refused adapter raises a one-line :class:`CheckpointError` and leaves the model untouched.
Selection indices are stored compactly (int32, delta varints or a bitmask, whichever is smallest);
every encoding round-trips exactly and adapters with int64 indices (format version 2) still load.
A model that already carries a method is refused before anything is written into it.
"""

from __future__ import annotations

import itertools
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

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import (
    FORMAT_VERSION,
    INDEX_ENCODINGS,
    decode_indices,
    decode_selection,
    encode_indices,
    load_adapter,
    state_checksum,
)
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
    return min(k for k in load_file(str(path)) if k.endswith(".values")).removesuffix(".values")


def index_key(state: State, name: str) -> str:
    """The key holding ``name``'s indices, in whichever encoding the file stores them."""
    (key,) = [f"{name}.{e}" for e in INDEX_ENCODINGS if f"{name}.{e}" in state]
    return key


def as_int64(state: State, name: str) -> None:
    """Store ``name``'s indices as plain int64 (as format version 2 did), in place."""
    key = index_key(state, name)
    state[f"{name}.indices"] = decode_indices(key.rsplit(".", 1)[1], state.pop(key))


def sizes_of(model: torch.nn.Module) -> dict[str, int]:
    return {f"model.{n}": p.numel() for n, p in model.named_parameters()}


def prompt_hooks(model: WpeftAurora) -> int:
    return sum(len(info.attention._forward_pre_hooks) for info in model.blocks)


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
    assert meta["format_version"] == FORMAT_VERSION == 3
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
        as_int64(state, name)  # a negative index has no delta or bitmask form
        state[f"{name}.indices"][-1] = bad

    rewrite(path, shift, update_checksum=True)
    assert_refused(path, rf"index {bad} of '{name}' is out of range \[0, {numel}\)")


def test_load_adapter_state_checks_before_writing(saved: Path) -> None:
    """Direct callers (run resumption) are checked too: nothing is written on refusal."""
    state = decode_selection(load_file(str(saved)))
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


# --- compact selection indices ------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(saved: Path) -> State:
    """The model state that loading the adapter as saved gives."""
    model = pretrained_like()
    load_adapter(saved, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def delta_bytes(indices: list[int]) -> int:
    """Bytes of the gaps between sorted indices (the first from 0) as LEB128 varints (7 bits a
    byte), counted by hand."""
    gaps = [indices[0]] + [b - a for a, b in itertools.pairwise(indices)]
    return sum(max(1, -(-gap.bit_length() // 7)) for gap in gaps)


def test_selection_adapter_stores_at_most_8_bytes_per_entry(saved: Path, tmp_path) -> None:
    stored = load_file(str(saved))
    decoded = decode_selection(stored)
    numel = sizes_of(pretrained_like())
    names = sorted(k.removesuffix(".values") for k in decoded if k.endswith(".values"))
    assert names and set(stored) == {index_key(stored, n) for n in names} | {
        f"{n}.values" for n in names
    }  # SFAS stores selections only
    assert all(stored[f"{n}.values"].dtype == torch.float32 for n in names)  # training dtype
    k = sum(decoded[f"{n}.values"].numel() for n in names)
    index_bytes = 0  # per tensor the smallest of int32, bitmask and delta varints, by hand
    for n in names:
        idx = decoded[f"{n}.indices"].tolist()
        index_bytes += min(4 * len(idx), -(-numel[n] // 8), delta_bytes(idx))

    def header_and_data(path: Path) -> tuple[int, int]:
        raw = path.read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")
        return header, len(raw) - header

    header, data = header_and_data(saved)
    assert data == 4 * k + index_bytes <= 8 * k
    assert json.loads(saved.with_suffix(".json").read_text())["stored_bytes"] == data
    legacy = tmp_path / "legacy.safetensors"  # the same adapter as format version 2 stored it
    save_file(
        {n: v.to(torch.int64) if n.endswith(".indices") else v for n, v in decoded.items()},
        str(legacy),
        metadata={"wpeft": "adapter"},
    )
    legacy_header, legacy_data = header_and_data(legacy)
    assert legacy_data == 12 * k
    assert data < 0.5 * legacy_data and header + data < 0.6 * (legacy_header + legacy_data)


#: (numel, indices): single entries at both ends, dense, multi-byte gaps, past int32.
CASES = [
    (13, [0]),
    (13, [12]),
    (13, list(range(13))),
    (13, [0, 5, 12]),
    (100_000, [0, 127, 128, 383, 16_511, 16_512, 99_999]),
    (2**31 + 5, [3, 2**21, 2**28 + 2**21, 2**31 + 4]),
]


@pytest.mark.parametrize("encoding", INDEX_ENCODINGS)
def test_every_index_encoding_round_trips_exactly(encoding: str) -> None:
    for numel, indices in CASES:
        if encoding == "indices_bitmask" and numel > 10**6:
            continue  # a 256 MiB bitmask: never the smallest there
        idx = torch.tensor(indices)
        got, data = encode_indices(idx, numel, encoding)
        assert got == encoding
        assert torch.equal(decode_indices(got, data), idx), (numel, indices)
        assert data.dtype == (
            (torch.int32 if numel < 2**31 else torch.int64)
            if encoding == "indices"
            else torch.uint8
        )
        if encoding == "indices_bitmask":
            assert data.numel() == -(-numel // 8)
        if encoding == "indices_delta":
            assert data.numel() == delta_bytes(indices)


def test_the_smallest_encoding_is_chosen_and_bad_encodings_refused() -> None:
    assert encode_indices(torch.arange(0, 1000, 2), 1000)[0] == "indices_bitmask"  # dense
    assert encode_indices(torch.arange(0, 10_000, 50), 10_000)[0] == "indices_delta"  # sparse
    assert encode_indices(torch.tensor([2**29, 2**30 + 2**29]), 2**31 - 1)[0] == "indices"
    unsorted = torch.tensor([5, 1])
    assert encode_indices(unsorted, 10)[0] == "indices"  # gaps need increasing indices
    with pytest.raises(ValueError, match="not possible"):
        encode_indices(unsorted, 10, "indices_delta")
    with pytest.raises(CheckpointError, match="end inside a number"):
        decode_indices("indices_delta", torch.tensor([1, 0x80], dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="needs 1-D uint8"):
        decode_indices("indices_bitmask", torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("encoding", INDEX_ENCODINGS)
def test_adapter_in_any_encoding_loads_exactly(saved: Path, loaded: State, tmp_path, encoding):
    path = copy_of(saved, tmp_path)
    numel = sizes_of(pretrained_like())

    def force(state: State) -> None:
        for name in [k.removesuffix(".values") for k in state if k.endswith(".values")]:
            as_int64(state, name)
            _, state[f"{name}.{encoding}"] = encode_indices(
                state.pop(f"{name}.indices"), numel[name], encoding
            )

    rewrite(path, force, update_checksum=True)
    assert all(k.endswith((f".{encoding}", ".values")) for k in load_file(str(path)))
    model = pretrained_like()
    load_adapter(path, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.items())


def test_adapter_with_int64_indices_still_loads(saved: Path, loaded: State, tmp_path) -> None:
    """Format version 2 stored every selection as int64 indices."""
    path = copy_of(saved, tmp_path)

    def legacy(state: State) -> None:
        for name in [k.removesuffix(".values") for k in state if k.endswith(".values")]:
            as_int64(state, name)

    rewrite(path, legacy, update_checksum=True)
    meta_path = path.with_suffix(".json")
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 2}))
    assert all(v.dtype == torch.int64 for k, v in load_file(str(path)).items() if "indices" in k)
    model = pretrained_like()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(path, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.items())


# --- one method per model -------------------------------------------------------------------------


def test_adapter_into_a_model_that_carries_a_method_is_refused(batch, tmp_path) -> None:
    path = trained_adapter("tadp", batch, tmp_path / "tadp", steps=1)
    model = pretrained_like()
    assert model.applied_method is None and prompt_hooks(model) == 0
    load_adapter(path, model)
    assert model.applied_method == "tadp"
    hooks = prompt_hooks(model)
    assert hooks == len(model.blocks)
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    before = snapshot(model)
    with pytest.raises(
        ConfigError,
        match=r"^Model already carries method 'tadp'; load the adapter into a pristine backbone "
        r"\(build_backbone / load_pretrained\)\.$",
    ):
        load_adapter(path, model)
    with pytest.raises(ConfigError, match="^Model already carries method 'tadp'; apply 'lora'"):
        create_method("lora").apply(model)
    assert prompt_hooks(model) == hooks
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    with torch.no_grad():
        got = model(batch)
    for k in expected.surf_vars:
        assert torch.equal(got.surf_vars[k], expected.surf_vars[k]), k
