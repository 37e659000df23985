"""Attaching the records to a training run: one object the training loop calls twice.

::

    recorders = attach_recorders(run_dir, method, model, task, start_step=step)
    ...                                   # per step, after opt.step() and step += 1:
    recorders.on_step(step)
    ...                                   # after the last step:
    recorders.close(step)

Selection methods (``method.selection`` not None: sfas, weatherpeft, fish, child_tuning_d) get a
:class:`~wpeft.runs.fisher_records.FisherRecorder`; methods with TADP generators
(``method.prompt_generators`` not None: tadp, weatherpeft) an
:class:`~wpeft.runs.attention_records.AttentionRecorder`; other methods record nothing.
``attach_recorders`` must run after ``method.prepare`` (static masks) and before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wpeft.runs.attention_records import AttentionRecorder
from wpeft.runs.fisher_records import FisherRecorder

if TYPE_CHECKING:
    from wpeft.methods.base import PEFTMethod

__all__ = ["Recorders", "attach_recorders"]


@dataclass
class Recorders:
    """The recorders of one run (either may be None)."""

    fisher: FisherRecorder | None = None
    attention: AttentionRecorder | None = None

    def on_step(self, step: int) -> None:
        """Call after each optimiser step with the number of completed steps."""
        if self.fisher is not None:
            self.fisher.on_step(step)
        if self.attention is not None:
            self.attention.on_step(step)

    def close(self, final_step: int) -> None:
        """Call once after the last step (the attention recorder runs its evaluation sample)."""
        if self.fisher is not None:
            self.fisher.close(final_step)
        if self.attention is not None:
            self.attention.close(final_step)


def attach_recorders(
    run_dir: str | Path,
    method: PEFTMethod,
    model: Any,
    task: Any,
    *,
    every: int = 10,
    attention_every: int = 0,
    blocks: Sequence[int] | None = None,
    image_size: int = 32,
    start_step: int = 0,
) -> Recorders:
    """The recorders that fit ``method``, attached and ready.

    Args:
        run_dir: The run directory.
        method / model / task: As in the training loop (method applied, masks prepared).
        every: Fisher records every ``every`` steps (plus the first and last).
        attention_every: Prompt attention every ``attention_every`` steps (0: at the end only).
        blocks: Blocks for mask images and attention maps (indices); default first, middle, last.
        image_size: Mask image size.
        start_step: The step training starts from (the resumed step; 0 for a fresh run, which
            clears old records).
    """
    out = Recorders()
    if method.selection is not None:
        out.fisher = FisherRecorder(
            method, run_dir, every=every, image_blocks=blocks, image_size=image_size,
            start_step=start_step,
        ).install()
    if method.prompt_generators is not None:
        out.attention = AttentionRecorder(
            method, model, task, run_dir, every=attention_every, blocks=blocks,
            start_step=start_step,
        )
    return out
