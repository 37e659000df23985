"""The parameter groups every wpeft backbone exposes: ``encoder``, ``backbone`` and ``decoder``.

Both adapters (:class:`~wpeft.backbones.aurora_adapter.WpeftAurora` and
:class:`~wpeft.backbones.prithvi_adapter.WpeftPrithvi`) hold three child modules with these
names; methods select what they train by group, by module identity (never by parameter name).
"""

from __future__ import annotations

from torch import nn

__all__ = ["GROUPS", "GroupedBackbone"]

#: The group names, in the order methods and records list them.
GROUPS: tuple[str, ...] = ("encoder", "backbone", "decoder")


class GroupedBackbone:
    """Mixin for an ``nn.Module`` with ``encoder``, ``backbone`` and ``decoder`` children."""

    encoder: nn.Module
    backbone: nn.Module
    decoder: nn.Module

    def _group_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "backbone": self.backbone, "decoder": self.decoder}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of the ``encoder``, ``backbone`` and ``decoder`` modules (by module)."""
        return {g: list(m.parameters()) for g, m in self._group_modules().items()}

    def named_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Like :meth:`parameter_groups`, with names as in ``state_dict()``."""
        return {
            g: [(f"{g}.{n}", p) for n, p in m.named_parameters()]
            for g, m in self._group_modules().items()
        }

    def num_parameters(self) -> dict[str, int]:
        """Scalar count per group and in total."""
        counts = {g: sum(p.numel() for p in ps) for g, ps in self.parameter_groups().items()}
        counts["total"] = sum(counts.values())
        return counts
