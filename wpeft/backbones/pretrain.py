"""The shipped pretrained backbone: its JSON card and its sha256-checked weights.

The ``tiny`` Aurora and the ``prithvi-tiny`` Prithvi-WxC ship with the package, each as
safetensors plus a JSON card (backbone config,
world config and seed, normalisation statistics, sha256 of the weights, held-out skill), written
by :func:`wpeft.training.pretrain.pretrain` (``wpeft pretrain``). This module only reads them:
loading a backbone needs nothing from the training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone, file_sha256
from wpeft.backbones.configs import config_from_dict
from wpeft.errors import CheckpointError
from wpeft.paths import package_data_dir

__all__ = ["load_pretrained", "pretrained_card", "shipped_backbones"]


def shipped_backbones() -> tuple[str, ...]:
    """Names of the pretrained backbones shipped in the package (``tiny``, ``prithvi-tiny``)."""
    return tuple(sorted(p.stem for p in package_data_dir().glob("*.json")))


def pretrained_card(name: str = "tiny", directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON card of a pretrained backbone (shipped in the package by default)."""
    path = Path(directory or package_data_dir()) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(
            f"No pretrained {name!r} backbone at {path}. Create one with "
            f"`wpeft pretrain --backbone {name} --out DIR` and pass --weights DIR."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"Corrupt backbone card {path}: {e}. Re-create it.") from e


def load_pretrained(name: str = "tiny", directory: str | Path | None = None) -> WpeftAurora:
    """Build a pretrained backbone from its card and verified weights (sha256)."""
    directory = Path(directory or package_data_dir())
    card = pretrained_card(name, directory)
    weights = directory / card["weights"]
    if not weights.is_file():
        raise CheckpointError(f"Weights {weights} named by the card are missing.")
    digest = file_sha256(weights)
    if digest != card["sha256"]:
        raise CheckpointError(
            f"Weights {weights} have sha256 {digest[:12]}..., the card expects "
            f"{card['sha256'][:12]}...: the file is corrupt or was replaced. Re-create it."
        )
    model = build_backbone(
        config_from_dict(card["backbone"]),
        checkpoint=weights,
        norm_mean=card["norm_mean"],
        norm_std=card["norm_std"],
    )
    model.eval()
    return model
