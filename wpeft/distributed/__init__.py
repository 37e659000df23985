"""Multi-process training on PyTorch's own engine (torchrun + DDP / FSDP2) and its planning.

Modules: :mod:`~wpeft.distributed.runtime` (process group from torchrun's environment, batch
sharding), :mod:`~wpeft.distributed.strategy` (DDP / FSDP2 wrapping), :mod:`~wpeft.distributed.launch`
(``wpeft train --dry-run``), :mod:`~wpeft.distributed.plan` (``wpeft plan``: per-GPU memory of
each strategy, adding up :mod:`~wpeft.distributed.inventory`, what the model and method keep,
and :mod:`~wpeft.distributed.activations`, what one forward saves for backward).
"""
