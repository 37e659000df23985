"""Adapter files: a fine-tuned model saved as only what fine-tuning changed.

An adapter is two files side by side:

* ``<stem>.safetensors`` — the tensors of :meth:`PEFTMethod.adapter_state` (selection methods as
  flat indices + ``<name>.values``, prompt generators, LoRA weights, heads);
* ``<stem>.json`` — metadata: the backbone config, fingerprint and a checksum of the pristine
  backbone weights, a checksum of the adapter's own tensors (``adapter_checksum``, from format
  version 2), the method and its config (and what the method records about the model it was
  applied to: TADP's ``prompt_variables``, the rows of E), budget, task and variables.

Selection indices are stored compactly (format version 3), in whichever of three encodings is
smallest for that tensor, named by the key's suffix (so the checksum covers the choice):

* ``<name>.indices`` — the flat indices, int32 when the tensor has fewer than 2**31 entries
  (int64 otherwise, and in files of version 2, which still load);
* ``<name>.indices_delta`` — uint8, the gaps between sorted indices (the first from 0) as LEB128
  varints: one byte per entry while entries lie less than 128 apart;
* ``<name>.indices_bitmask`` — uint8, one bit per entry of the tensor (LSB first), set where
  selected: ``ceil(numel / 8)`` bytes, the smallest once more than about one entry in 8 is
  selected (one in 32 against int32).

Values keep the parameter's dtype, so the round trip is exact. :func:`decode_selection`
turns every encoding back into int64 ``<name>.indices``.

Loading applies the same method to a *pristine* backbone and writes the tensors back, which
reproduces the fine-tuned outputs exactly. A different backbone, tensors modified since they
were saved, NaN/inf values, selection indices out of range and TADP generators built for other
variables than the model's encoder feeds (another task's) are refused with a
:class:`CheckpointError` before anything is written into the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, nonfinite_tensors
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods.base import (
    PEFTMethod,
    check_selection,
    create_method,
    method_class,
    plain_name,
)

__all__ = [
    "INDEX_ENCODINGS",
    "decode_indices",
    "decode_selection",
    "encode_indices",
    "encode_selection",
    "load_adapter",
    "pretrained_state",
    "save_adapter",
    "state_checksum",
]

#: 2 adds ``adapter_checksum`` (files of version 1 still load, unverified, with a warning);
#: 3 stores selection indices compactly (files of version 2, int64 indices, still load).
FORMAT_VERSION = 3

#: Key suffixes of the index encodings (see the module docstring), in order of preference.
INDEX_ENCODINGS = ("indices", "indices_bitmask", "indices_delta")
_INT32_LIMIT = 2**31
_VARINT_MAX_BYTES = 9  # 63 bits: every int64 gap


def _varint_lengths(gaps: torch.Tensor) -> torch.Tensor:
    """Bytes of each non-negative int64 gap as a LEB128 varint (7 bits per byte, at least 1)."""
    n = torch.ones_like(gaps)
    for j in range(1, _VARINT_MAX_BYTES):
        n += gaps >= (1 << (7 * j))
    return n


def _strictly_increasing(idx: torch.Tensor) -> bool:
    return bool(idx.numel() == 0 or (idx[0] >= 0 and (idx[1:] > idx[:-1]).all()))


def encode_indices(
    idx: torch.Tensor, numel: int, encoding: str | None = None
) -> tuple[str, torch.Tensor]:
    """The stored form of one tensor's flat selection indices: ``(suffix, tensor)``.

    Args:
        idx: 1-D integer indices into a tensor of ``numel`` entries.
        numel: Entries of the selected tensor (bounds the bitmask and the int32 choice).
        encoding: One of :data:`INDEX_ENCODINGS` to force it; None picks the smallest. The
            delta and bitmask encodings need strictly increasing non-negative indices (as
            :meth:`PEFTMethod.adapter_state` writes them), the bitmask also indices below
            ``numel``; otherwise only ``indices`` is possible (forcing another: ValueError).
    """
    idx = idx.detach().reshape(-1).to("cpu", torch.int64)
    raw_dtype = torch.int32 if numel < _INT32_LIMIT else torch.int64
    sizes = {"indices": idx.numel() * (4 if raw_dtype == torch.int32 else 8)}
    gaps = None
    if _strictly_increasing(idx):
        gaps = torch.diff(idx, prepend=idx.new_zeros(1))
        if idx.numel() == 0 or int(idx[-1]) < numel:
            sizes["indices_bitmask"] = -(-numel // 8)
        sizes["indices_delta"] = int(_varint_lengths(gaps).sum())
    if encoding is None:
        encoding = min(sizes, key=sizes.__getitem__)  # ties: the earlier in INDEX_ENCODINGS
    elif encoding not in sizes:
        raise ValueError(
            f"Index encoding {encoding!r} is not possible here; possible: {sorted(sizes)}."
        )
    if encoding == "indices":
        return encoding, idx.to(raw_dtype)
    if encoding == "indices_bitmask":
        bits = torch.zeros(sizes[encoding] * 8, dtype=torch.uint8)
        bits[idx] = 1
        weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
        return encoding, (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    assert gaps is not None
    lengths = _varint_lengths(gaps)
    owner = torch.repeat_interleave(torch.arange(gaps.numel()), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(int(lengths.sum())) - starts[owner]  # byte number within its varint
    more = (j < lengths[owner] - 1).to(torch.int64) << 7  # continuation bit
    return encoding, (((gaps[owner] >> (7 * j)) & 0x7F) | more).to(torch.uint8)


def decode_indices(encoding: str, data: torch.Tensor) -> torch.Tensor:
    """int64 flat indices from their stored form (inverse of :func:`encode_indices`).

    Raises:
        CheckpointError: ``data`` is not a valid tensor of that encoding.
    """
    if encoding == "indices":
        integer = not (data.is_floating_point() or data.is_complex() or data.dtype == torch.bool)
        # int32, or int64 (version 2 and huge tensors); anything else check_selection refuses
        return data.to(torch.int64) if integer else data
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise CheckpointError(
            f"Adapter index encoding {encoding!r} needs 1-D uint8 data, got {data.dtype} "
            f"{tuple(data.shape)}: the adapter is corrupt; re-save it."
        )
    if encoding == "indices_bitmask":
        bits = (data.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
        return bits.reshape(-1).nonzero().squeeze(1)
    if encoding != "indices_delta":
        raise CheckpointError(f"Unknown adapter index encoding {encoding!r}; re-save the adapter.")
    if data.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    b = data.to(torch.int64)
    last = b < 0x80  # the final byte of each varint
    if not bool(last[-1]):
        raise CheckpointError(
            "Adapter delta-encoded indices end inside a number: the adapter is corrupt; re-save it."
        )
    owner = torch.cumsum(last, 0) - last.to(torch.int64)  # varint each byte belongs to
    first = torch.cat([torch.ones(1, dtype=torch.bool), last[:-1]]).nonzero().squeeze(1)
    j = torch.arange(b.numel()) - first[owner]
    if int(j.max()) >= _VARINT_MAX_BYTES:
        raise CheckpointError(
            "Adapter delta-encoded indices hold a number too long for int64: the adapter is "
            "corrupt; re-save it."
        )
    gaps = torch.zeros(first.numel(), dtype=torch.int64).index_add_(0, owner, (b & 0x7F) << (7 * j))
    return torch.cumsum(gaps, 0)


def _split_index_key(key: str) -> tuple[str, str] | None:
    """``(name, encoding)`` for a stored index key, else None."""
    name, _, suffix = key.rpartition(".")
    return (name, suffix) if name and suffix in INDEX_ENCODINGS else None


def encode_selection(
    state: dict[str, torch.Tensor], numel: dict[str, int]
) -> dict[str, torch.Tensor]:
    """``state`` with every ``<name>.indices`` in its smallest encoding (:func:`encode_indices`);
    names missing from ``numel`` keep their indices as they are."""
    out = {}
    for key, t in state.items():
        name, _, suffix = key.rpartition(".")
        if suffix == "indices" and name in numel:
            encoding, t = encode_indices(t, numel[name])
            key = f"{name}.{encoding}"
        out[key] = t
    return out


def decode_selection(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every stored index encoding turned back into int64 ``<name>.indices``.

    Raises:
        CheckpointError: A tensor stores its indices twice, or an encoding is malformed.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        split = _split_index_key(key)
        if split is None:
            out[key] = t
            continue
        name, encoding = split
        if f"{name}.indices" in out:
            raise CheckpointError(
                f"Adapter selection {name!r} stores its indices twice: the adapter is corrupt; "
                "re-save it."
            )
        out[f"{name}.indices"] = decode_indices(encoding, t)
    return out


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, shapes, dtypes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pretrained_state(model: WpeftAurora, head: nn.Module | None) -> dict[str, torch.Tensor]:
    """The model's state without the task head's parameters (which a task may have inserted
    into the encoder/decoder): what the adapter's backbone checksum covers."""
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    names = {name for name, p in model.named_parameters() if id(p) in head_ids}
    return {k: v for k, v in model.state_dict().items() if k not in names}


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_adapter(
    method: PEFTMethod,
    reference: dict[str, torch.Tensor],
    path: str | Path,
    **metadata: Any,
) -> Path:
    """Write ``method``'s adapter (what changed relative to ``reference``) atomically.

    Args:
        method: An applied, trained method.
        reference: The pristine backbone's (and head's, ``head.<name>``) state.
        path: Destination stem; ``.safetensors`` and ``.json`` are written.
        metadata: Extra JSON-serialisable fields (budget, task, variables, ...).
    """
    assert method.model is not None, "apply and train the method first"
    tensors_path, meta_path = _paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in method.adapter_state(reference).items()}
    stored = encode_selection(state, {name: p.numel() for name, p in method.named_parameters()})
    head_names = (
        {method._pristine_name[id(p)] for p in method.head.parameters()} if method.head else set()
    )
    model_ref = {
        k: v for k, v in reference.items() if not k.startswith("head.") and k not in head_names
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "backbone": method.model.config.to_dict(),
        "backbone_fingerprint": method.model.config.fingerprint(),
        "backbone_checksum": state_checksum(model_ref),
        "adapter_checksum": state_checksum(stored),  # what the file holds
        "method": method.name,
        "method_config": method.config.to_dict(),
        **method.adapter_metadata(),
        "trainable": method.trainable(),
        "changed": method.changed(reference),
        "stored_scalars": sum(v.numel() for v in state.values()),
        "stored_bytes": sum(v.numel() * v.element_size() for v in stored.values()),
        "index_encodings": {
            e: sum(1 for k in stored if k.endswith(f".{e}")) for e in INDEX_ENCODINGS
        },
        **metadata,
    }
    for target, write in (
        (tensors_path, lambda t: save_file(stored, str(t), metadata={"wpeft": "adapter"})),
        (meta_path, lambda t: t.write_text(json.dumps(meta, indent=2, default=str))),
    ):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return tensors_path


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an adapter (clear error when missing or corrupt)."""
    _, meta_path = _paths(path)
    if not meta_path.is_file():
        raise CheckpointError(f"Adapter metadata {meta_path} does not exist.")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"Adapter metadata {meta_path} is corrupt: {e}.") from e


def load_adapter(
    path: str | Path, model: WpeftAurora, head: nn.Module | None = None
) -> PEFTMethod:
    """Apply the saved method to a pristine ``model`` (and ``head``) and load its tensors.

    Raises :class:`ConfigError` when the model already carries a method (its prompt hooks or
    LoRA layers would stack with the adapter's), and :class:`CheckpointError` when the model is
    not the backbone the adapter was trained from (architecture or weights differ), when the
    files are missing, corrupt or modified since they were saved, or hold NaN/inf or
    out-of-range selection indices; the model is then left untouched.
    """
    if model.applied_method is not None:
        raise ConfigError(
            f"Model already carries method {model.applied_method!r}; load the adapter into a "
            "pristine backbone (build_backbone / load_pretrained)."
        )
    tensors_path, _ = _paths(path)
    meta = read_adapter_metadata(path)
    if meta.get("backbone_fingerprint") != model.config.fingerprint():
        raise CheckpointError(
            f"Adapter {tensors_path.name} was trained on backbone "
            f"{meta.get('backbone', {}).get('name')!r} (fingerprint "
            f"{meta.get('backbone_fingerprint')}), not on this {model.config.name!r} "
            f"({model.config.fingerprint()}). Load it onto the backbone it was trained from."
        )
    checksum = state_checksum(pretrained_state(model, head))
    if meta.get("backbone_checksum") != checksum:
        raise CheckpointError(
            f"Adapter {tensors_path.name} expects pristine backbone weights with checksum "
            f"{str(meta.get('backbone_checksum'))[:12]}..., this model has {checksum[:12]}...: "
            "wrong pretrained weights, or the model was already fine-tuned."
        )
    state = _read_tensors(tensors_path, meta)
    # Checked against the pristine model before the method touches it: a refusal leaves the
    # model as it was (load_adapter_state checks again against what the method installs).
    sizes = {f"model.{plain_name(n)}": p.numel() for n, p in model.named_parameters()}
    if head is not None:
        sizes.update({f"head.{n}": p.numel() for n, p in head.named_parameters()})
    check_selection(state, sizes)
    method_class(meta["method"]).check_adapter_metadata(meta, model)
    method = create_method(meta["method"], **meta["method_config"])
    method.apply(model, head)
    method.load_adapter_state(state)
    return method


def _read_tensors(tensors_path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An adapter's tensors, verified against the checksum in its metadata (over the tensors as
    stored) and for NaN/inf, with their selection indices decoded (:func:`decode_selection`)."""
    if not tensors_path.is_file():
        raise CheckpointError(f"Adapter tensors {tensors_path} do not exist.")
    try:
        state = load_file(str(tensors_path))
    except Exception as e:
        raise CheckpointError(f"Adapter tensors {tensors_path} are corrupt ({e}).") from e
    expected = meta.get("adapter_checksum")
    if expected is None:
        warnings.warn(
            f"Adapter {tensors_path} predates adapter checksums and cannot be checked for "
            "corruption; re-save it to add one.",
            stacklevel=3,
        )
    elif (actual := state_checksum(state)) != expected:
        raise CheckpointError(
            f"Adapter tensors {tensors_path} were modified or corrupted since they were saved "
            f"(checksum {actual[:12]}..., saved {str(expected)[:12]}...); restore the file from "
            "a copy or re-train the adapter."
        )
    bad = nonfinite_tensors(state)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"Adapter tensors {tensors_path} hold non-finite values (NaN/inf) in {bad[0]!r}{more}: "
            "the run that trained it diverged; re-train it or use an earlier adapter."
        )
    try:
        return decode_selection(state)
    except CheckpointError as e:
        raise CheckpointError(f"Adapter tensors {tensors_path}: {e}") from e
