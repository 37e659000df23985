"""Adapter files: a fine-tuned model saved as only what fine-tuning changed.

An adapter is two files side by side:

* ``<stem>.safetensors`` — the tensors of :meth:`PEFTMethod.adapter_state` (selection methods as
  ``<name>.indices`` + ``<name>.values``, prompt generators, LoRA weights, heads);
* ``<stem>.json`` — metadata: the backbone config, fingerprint and a checksum of the pristine
  backbone weights, a checksum of the adapter's own tensors (``adapter_checksum``, from format
  version 2), the method and its config, budget, task and variables.

Loading applies the same method to a *pristine* backbone and writes the tensors back, which
reproduces the fine-tuned outputs exactly. A different backbone, tensors modified since they
were saved, NaN/inf values and selection indices out of range are refused with a
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
from wpeft.errors import CheckpointError
from wpeft.methods.base import PEFTMethod, check_selection, create_method, plain_name

__all__ = ["load_adapter", "pretrained_state", "save_adapter", "state_checksum"]

#: 2 adds ``adapter_checksum`` (files of version 1 still load, unverified, with a warning).
FORMAT_VERSION = 2


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
        "adapter_checksum": state_checksum(state),
        "method": method.name,
        "method_config": method.config.to_dict(),
        "trainable": method.trainable(),
        "changed": method.changed(reference),
        "stored_scalars": sum(v.numel() for v in state.values()),
        **metadata,
    }
    for target, write in (
        (tensors_path, lambda t: save_file(state, str(t), metadata={"wpeft": "adapter"})),
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

    Raises :class:`CheckpointError` when the model is not the backbone the adapter was trained
    from (architecture or weights differ), when the files are missing, corrupt or modified since
    they were saved, or hold NaN/inf or out-of-range selection indices; the model is then left
    untouched.
    """
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
    method = create_method(meta["method"], **meta["method_config"])
    method.apply(model, head)
    method.load_adapter_state(state)
    return method


def _read_tensors(tensors_path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An adapter's tensors, verified against the checksum in its metadata and for NaN/inf."""
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
    return state
