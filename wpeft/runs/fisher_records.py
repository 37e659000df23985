"""Fisher-mask records: how the entries a selection method updates move during training.

For SFAS / WeatherPEFT (a fresh top-k mask every refresh) and the static Fisher masks (FISH,
Child-Tuning_D), :class:`FisherRecorder` records at steps 0, ``every``, ``2·every``, ... and the
last step, per backbone block and tensor kind, into ``<run>/records/fisher/``.

Groups. Every backbone parameter ``model.backbone.<name>`` belongs to one (block, tensor) group,
as the backbone says (``model.parameter_blocks()``, :func:`block_groups`): ``block`` is the
block's name (Aurora's Swin3D block ``encoder0.1`` = encoder stage 0, block 1; Prithvi-WxC's
transformer ``encoder0.3`` = encoder block 3; as ``model.blocks[i].name``, records in execution
order) or ``other`` for parameters outside blocks (Aurora's patch merging / splitting, the
lead-time MLP); ``tensor`` is ``qkv``, ``proj``, ``fc1``, ``fc2`` (weights and biases
together), ``norm1``, ``norm2`` (Aurora: the adaptive layer norms' modulation; Prithvi: the
attention's and the MLP's LayerNorm) or ``other``. The layout is unchanged from Aurora-only
records (Aurora's groups are those :func:`classify` gives from parameter names).

Variables of the record (dims ``(step, block, tensor)``, NaN where a block has no such tensor):

* ``density``: |M ∩ G| / |G|, the fraction of the group's entries in the step's mask M;
* ``selected``: |M ∩ G| (so Σ over groups of ``selected`` is k at every step);
* ``fisher_mass``: Σ_{i ∈ G ∩ M} g_i² / Σ_{i ∈ G} g_i², the share of the group's importance
  that the mask captures, with g the *same step's* mini-batch gradient of the loss (before any
  masking or clipping), i.e. the one-batch empirical Fisher diagonal. It is g² whatever the
  method's own ``importance`` setting (``abs_grad`` ranks by |g|) and it ignores SFAS's noise and
  accumulation window: it measures how much of this step's Fisher the update actually uses.
  NaN where the group's gradient is exactly zero. A lean selection (``lean=True``) keeps no
  dense gradient: its hooks sum g² while backward runs at a refresh, so ``fisher_mass`` is
  recorded at refresh steps and is NaN at the steps between (and for lean static masks);
* ``jaccard_previous``: |M ∩ M'| / |M ∪ M'| over the group's entries, M' the previously
  *recorded* mask (NaN at the first record, or where both are empty);
* ``jaccard_first``: the same against the first recorded mask (1 at the first record, NaN
  where both are empty);
* ``union_density``: fraction of the group's entries selected at least once so far (the method's
  ``union_masks``, i.e. every mask used, recorded or not; static masks: the mask itself).

``group_size`` ``(block, tensor)`` holds |G|; ``total_*`` ``(step,)`` the same quantities over the
whole backbone.

Mask images. For the weight *matrices* (qkv, proj, fc1, fc2) of chosen blocks (default: the
first, a middle and the last block), ``mask_image`` ``(step, matrix, row, col)`` is the mask
pooled to at most ``image_size`` x ``image_size`` (default 32): rows are split into
``min(rows, image_size)`` contiguous, nearly equal bins (edges ``floor(i·rows/n)``), columns
likewise, and each pixel is the mean of the boolean mask over its bin, i.e. the local density.
A matrix with fewer rows (or columns) than ``image_size`` keeps its native size (no upsampling)
and the image is padded with NaN beyond it; ``image_rows`` / ``image_cols`` ``(matrix,)`` give the
used size and ``matrix_rows`` / ``matrix_cols`` the matrix shape.

When importance is read. The mask callback of SFAS runs inside ``after_backward`` before the
gradients outside the mask are zeroed, but static masks call it only once, before training,
without gradients. The recorder therefore wraps the method's ``after_backward`` on the instance
(:meth:`FisherRecorder.install`): just before it, Σ g² per tensor is taken from the untouched
gradients; just after it (the mask of this step is now chosen), Σ g² inside the mask. No copy of
the gradients is made. The record is written at :meth:`FisherRecorder.on_step` (after the
optimiser step) or :meth:`FisherRecorder.close`.

Resuming: the first recorded mask and the last ``mask_history`` (default 6) recorded masks are
kept bit-packed in ``records/fisher/masks/`` (N/8 bytes each, N eligible entries) so that a
resumed run continues ``jaccard_first`` / ``jaccard_previous`` exactly; records at or after the
resumed step are dropped and recorded again. If the resumed step lies further back than the kept
history, ``jaccard_previous`` is NaN at the first record after resuming.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from wpeft.errors import ConfigError
from wpeft.methods.lean import LeanSelection
from wpeft.runs.layout import FISHER_MASKS
from wpeft.runs.store import RecordStore

if TYPE_CHECKING:
    from wpeft.methods.base import PEFTMethod

__all__ = [
    "MATRIX_KINDS",
    "TENSOR_KINDS",
    "FisherRecorder",
    "bin_edges",
    "block_groups",
    "classify",
    "default_blocks",
    "jaccard",
    "pool_mask",
]

TENSOR_KINDS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2", "other")
MATRIX_KINDS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
_PREFIXES = (
    ("attn.qkv", "qkv"),
    ("attn.proj", "proj"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("norm1", "norm1"),
    ("norm2", "norm2"),
)
_BLOCK = re.compile(r"(?:^|\.)(encoder|decoder)_layers\.(\d+)\.blocks\.(\d+)\.(.+)$")


def classify(name: str) -> tuple[str, str]:
    """(block, tensor kind) of a backbone parameter name.

    >>> classify("model.backbone.encoder_layers.0.blocks.1.attn.qkv.weight")
    ('encoder0.1', 'qkv')
    >>> classify("model.backbone.encoder_layers.0.downsample.reduction.weight")
    ('other', 'other')
    """
    m = _BLOCK.search(name)
    if m is None:
        return "other", "other"
    stage, layer, depth, rest = m.groups()
    for prefix, kind in _PREFIXES:
        if rest == prefix or rest.startswith(prefix + "."):
            return f"{stage}{layer}.{depth}", kind
    return f"{stage}{layer}.{depth}", "other"


#: Prefix of the eligible parameter names of a selection (``model.backbone.<name>``).
BACKBONE_PREFIX = "model.backbone."


def block_groups(names: Sequence[str], model: Any | None) -> list[tuple[str, str]]:
    """(block, tensor kind) of each parameter name ``model.backbone.<name>``, as the backbone
    says (``model.parameter_blocks()``: Aurora's Swin3D blocks, Prithvi-WxC's transformers);
    ``("other", "other")`` outside the blocks. Without a model: :func:`classify` (Aurora's
    parameter names)."""
    if model is None:
        return [classify(n) for n in names]
    owner = model.parameter_blocks()
    return [owner.get(n.removeprefix(BACKBONE_PREFIX), ("other", "other")) for n in names]


def jaccard(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks of one shape; NaN if both are empty."""
    if isinstance(a, torch.Tensor):
        inter, union = int((a & b).sum()), int((a | b).sum())
    else:
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        inter, union = int((a & b).sum()), int((a | b).sum())
    return inter / union if union else float("nan")


def bin_edges(n: int, bins: int) -> np.ndarray:
    """``bins + 1`` edges ``floor(i·n/bins)`` splitting ``range(n)`` into contiguous bins whose
    sizes differ by at most one (``bins <= n``)."""
    if not 1 <= bins <= n:
        raise ValueError(f"Need 1 <= bins <= n, got bins={bins}, n={n}.")
    return (np.arange(bins + 1, dtype=np.int64) * n) // bins


def pool_mask(mask: np.ndarray | torch.Tensor, size: int = 32) -> np.ndarray:
    """Local density of a 2-D boolean mask ``(rows, cols)`` pooled to at most ``size`` x ``size``.

    Returns:
        float32 ``(min(rows, size), min(cols, size))``: the mean of the mask over each bin of
        :func:`bin_edges` (a dimension smaller than ``size`` keeps one bin per row / column).
    """
    if mask.ndim != 2:
        raise ValueError(f"pool_mask needs a 2-D mask, got shape {tuple(mask.shape)}.")
    rows, cols = mask.shape
    br, bc = min(rows, size), min(cols, size)
    if isinstance(mask, torch.Tensor):
        m = mask.detach()
        if rows % br == 0 and cols % bc == 0:  # equal bins: a reshape, on the mask's device
            pooled = m.reshape(br, rows // br, bc, cols // bc).float().mean(dim=(1, 3))
            return pooled.cpu().numpy()
        m = m.cpu().numpy()
    m = np.asarray(mask if not isinstance(mask, torch.Tensor) else m, dtype=np.float32)
    re_, ce = bin_edges(rows, br), bin_edges(cols, bc)
    sums = np.add.reduceat(np.add.reduceat(m, re_[:-1], axis=0), ce[:-1], axis=1)
    counts = np.diff(re_)[:, None] * np.diff(ce)[None, :]
    return (sums / counts).astype(np.float32)


def default_blocks(n_blocks: int) -> list[int]:
    """The first, a middle and the last block index (fewer if there are fewer blocks)."""
    return sorted({0, n_blocks // 2, n_blocks - 1}) if n_blocks else []


def _pack(masks: Sequence[torch.Tensor]) -> np.ndarray:
    flat = torch.cat([m.reshape(-1) for m in masks]).cpu().numpy()
    return np.packbits(flat)


def _unpack(bits: np.ndarray, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    n = sum(m.numel() for m in like)
    flat = torch.from_numpy(np.unpackbits(bits)[:n].astype(bool))
    out, start = [], 0
    for m in like:
        out.append(flat[start : start + m.numel()].view(m.shape).to(m.device))
        start += m.numel()
    return out


def _attrs(long_name: str, description: str | None = None) -> dict[str, str]:
    """CF-style attributes of a dimensionless record variable."""
    out = {"units": "1", "long_name": long_name}
    if description:
        out["description"] = description
    return out


def _counts(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.count_nonzero(m) for m in masks]).double()


class FisherRecorder:
    """Records a selection method's masks per (block, tensor) group at intervals.

    Args:
        method: An applied selection method (``method.selection``: ``sfas``, ``weatherpeft``,
            ``fish``, ``child_tuning_d``); static masks must be prepared before recording.
        run_dir: The run directory (records go to ``<run>/records/fisher``).
        every: Record at steps that are multiples of ``every`` and at the last step (steps are
            the 0-based optimiser-step indices passed to ``after_backward``).
        image_blocks: Block indices (execution order) or names whose weight matrices get mask
            images; default :func:`default_blocks`.
        image_size: Pooled image size (at most ``image_size`` x ``image_size``).
        start_step: The step training starts from (> 0 when resuming): records from it on are
            dropped; 0 clears old records.
        mask_history: Recorded masks kept on disk (bit-packed) for resuming, besides the first
            (0: none; a resumed run then starts ``jaccard_previous`` / ``jaccard_first`` afresh).
            Resuming from a checkpoint ``c`` steps back needs ``c / every + 1`` of them.
    """

    kind = "fisher"

    def __init__(
        self,
        method: PEFTMethod,
        run_dir: str | Path,
        *,
        every: int = 10,
        image_blocks: Sequence[int | str] | None = None,
        image_size: int = 32,
        start_step: int = 0,
        mask_history: int = 6,
    ) -> None:
        if method.selection is None:
            raise ConfigError(
                f"FisherRecorder needs an applied selection method (sfas, weatherpeft, fish, "
                f"child_tuning_d); got {method.name!r}."
            )
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}.")
        self.method = method
        self.every = int(every)
        self.image_size = int(image_size)
        self.mask_history = int(mask_history)
        self.store = RecordStore(run_dir, self.kind)
        sel = method.selection
        self.selection = sel
        self.names: list[str] = list(sel.names)
        #: The eligible parameters (shapes are the full tensors' also under FSDP2).
        self.params: list[torch.Tensor] = list(sel.params)

        model = method.model
        block_names = [b.name for b in model.blocks] if model is not None else []
        groups = block_groups(self.names, model)
        used = {b for b, _ in groups}
        self.blocks = [b for b in block_names if b in used] + sorted(used - set(block_names))
        self.group_index = np.array(
            [self.blocks.index(b) * len(TENSOR_KINDS) + TENSOR_KINDS.index(k) for b, k in groups],
            dtype=np.int64,
        )
        sizes = np.zeros(len(self.blocks) * len(TENSOR_KINDS))
        np.add.at(sizes, self.group_index, [p.numel() for p in self.params])
        self.group_size = sizes.reshape(len(self.blocks), len(TENSOR_KINDS))

        if image_blocks is None:
            image_blocks = default_blocks(len(block_names))
        chosen = {block_names[b] if isinstance(b, int) else str(b) for b in image_blocks}
        unknown = chosen - set(block_names)
        if unknown:
            raise ConfigError(
                f"image_blocks {sorted(unknown)} are not blocks; blocks: {block_names}."
            )
        self.matrices: list[tuple[int, str]] = [
            (i, f"{b}/{k}")
            for i, ((b, k), p) in enumerate(zip(groups, self.params))
            if b in chosen and k in MATRIX_KINDS and p.dim() == 2
        ]

        self._first: list[torch.Tensor] | None = None
        self._previous: list[torch.Tensor] | None = None
        self._first_count: torch.Tensor | None = None  # (n_tensors,) entries per mask
        self._previous_count: torch.Tensor | None = None
        self._first_step: int | None = None
        self._previous_step: int | None = None
        self._pending: list[tuple[int, xr.Dataset]] = []
        self._totals: torch.Tensor | None = None
        self._wrapper: Any = None
        self._replaced: Any = None
        self._start(start_step)

    # --- set-up -----------------------------------------------------------------------------

    def _start(self, start_step: int) -> None:
        masks_dir = self.store.path / FISHER_MASKS
        if start_step <= 0:
            self.store.clear()
            for f in masks_dir.glob("*") if masks_dir.exists() else ():
                f.unlink(missing_ok=True)
            return
        self.store.truncate(start_step)
        if not masks_dir.exists():
            return
        like = [torch.empty(p.shape, dtype=torch.bool, device=self.selection.device) for p in self.params]
        local = self.selection.local_parts  # the masks on disk are full; a shard keeps its part
        kept = []
        for f in sorted(masks_dir.glob("step-*.npy")):
            step = int(f.stem.split("-")[1])
            if step >= start_step:
                f.unlink(missing_ok=True)
            else:
                kept.append((step, f))
        first = masks_dir / "first.npz"
        if first.exists():
            with np.load(first) as state:
                keep = int(state["step"]) < start_step
                if keep:
                    self._first = local(_unpack(state["bits"], like))
                    self._first_step = int(state["step"])
                    self._first_count = _counts(self._first)
            if not keep:
                first.unlink()
        if kept:
            step, f = kept[-1]
            self._previous = local(_unpack(np.load(f), like))
            self._previous_step = step
            self._previous_count = _counts(self._previous)

    def install(self) -> FisherRecorder:
        """Wrap ``method.after_backward`` (on the instance) to read the gradients around it."""
        if self._wrapper is not None:
            return self
        original = self.method.after_backward
        self._replaced = self.method.__dict__.get("after_backward")  # an earlier instance wrapper

        lean = self.selection.lean
        if isinstance(self.selection, LeanSelection):  # its hooks take Σg² on recorded steps
            self.selection.square_sums_due = self.due

        def after_backward(step: int, total_steps: int) -> None:
            due = self.due(step, total_steps)
            if due and not lean:
                self._totals = self._grad_square_sums(masks=None)
            original(step, total_steps)
            if due:
                if lean:  # the hooks summed g² while backward ran (refresh steps only)
                    self._totals = self._grad_square_sums(masks=None)
                self._capture(step)

        self.method.after_backward = self._wrapper = after_backward
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (only if our wrapper is still the outermost one)."""
        if self._wrapper is None or self.method.__dict__.get("after_backward") is not self._wrapper:
            return
        if isinstance(self.selection, LeanSelection):
            self.selection.square_sums_due = None
        if self._replaced is None:
            del self.method.after_backward  # the class's after_backward is visible again
        else:
            self.method.after_backward = self._replaced
        self._wrapper = self._replaced = None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` (0-based) is recorded: a multiple of ``every`` or the last step."""
        return step % self.every == 0 or step == total_steps - 1

    # --- measuring --------------------------------------------------------------------------

    def _grad_square_sums(self, masks: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """``(n_tensors,)`` float64 Σ g² per tensor (inside ``masks`` if given; 0 if no grad);
        this rank's shards only under FSDP2 (summed over ranks in :meth:`_capture`). A lean
        selection keeps no dense gradient: it gives the sums it took during backward (over all
        entries only at refresh steps, NaN between them)."""
        if self.selection.lean:
            return self.selection.grad_square_sums(masks).to(self.selection.device)
        out = []
        for i, g in enumerate(self.selection.grads()):
            if g is None:
                out.append(torch.zeros((), dtype=torch.float64, device=self.selection.device))
                continue
            g = g.detach().float()
            if masks is None:
                out.append(torch.linalg.vector_norm(g).double().square())
            else:
                inside = torch.where(masks[i].to(g.device), g, 0.0)
                out.append(torch.linalg.vector_norm(inside).double().square())
        return torch.stack(out)

    def _capture(self, step: int) -> None:
        masks = self.selection.masks
        if masks is None:
            raise RuntimeError("The method has no mask to record yet.")
        union = self.selection.union_masks or masks
        inside = self._grad_square_sums(masks)
        totals = self._totals if self._totals is not None else inside
        count = _counts(masks)
        stats = [count, _counts(union), totals, inside]
        # Against the previous and the first recorded mask: |A ∩ B|, |A ∪ B| = |A| + |B| − |A ∩ B|.
        # Without a previous mask the pair is zeros (NaN later); the first record is its own first.
        for ref, ref_count, is_first in (
            (self._previous, self._previous_count, False),
            (self._first, self._first_count, True),
        ):
            if ref is None or ref_count is None:
                if is_first:
                    stats += [count, count]
                else:
                    zeros = torch.zeros(len(masks), dtype=torch.float64, device=count.device)
                    stats += [zeros, zeros]
                continue
            inter = torch.stack([torch.count_nonzero(m & r) for m, r in zip(masks, ref)]).double()
            stats += [inter, count + ref_count.to(count.device) - inter]
        per_tensor = torch.stack([s.to(totals.device) for s in stats], 1)  # (n, 8)
        # Every statistic is a sum over entries: under FSDP2 the shards' sums add up.
        collective = self.selection.collective
        per_tensor = collective.sum_(per_tensor.to(collective.device)).cpu().numpy()
        shown = [masks[i] for i, _ in self.matrices]
        if self.selection.sharded:  # the images need the full matrices
            shown = collective.gather_full(shown, [self.selection.spans[i] for i, _ in self.matrices])
        images = [pool_mask(m, self.image_size) for m in shown]
        ds = self._dataset(step, per_tensor, images, self._previous is not None)
        self._pending.append((step, ds))
        snapshot = [m.detach().clone() for m in masks]
        if self._first is None:
            self._first, self._first_step, self._first_count = snapshot, step, count
        self._previous, self._previous_step, self._previous_count = snapshot, step, count
        self._totals = None

    def _dataset(
        self, step: int, per_tensor: np.ndarray, images: list[np.ndarray], has_prev: bool
    ) -> xr.Dataset:
        n_groups = len(self.blocks) * len(TENSOR_KINDS)
        sums = np.zeros((n_groups, per_tensor.shape[1]))
        np.add.at(sums, self.group_index, per_tensor)
        shape = (len(self.blocks), len(TENSOR_KINDS))
        size = self.group_size.reshape(-1)
        exists = size > 0
        sel, uni, tot, ins, ip, up, i_f, u_f = sums.T

        def ratio(a: np.ndarray, b: np.ndarray, valid: bool | np.ndarray = True) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.where(exists & (b > 0) & valid, a / np.where(b > 0, b, 1), np.nan)
            return r.reshape(shape)

        def total_ratio(a: np.ndarray, b: np.ndarray, valid: bool = True) -> float:
            return float(a.sum() / b.sum()) if valid and b.sum() > 0 else float("nan")

        group = ("block", "tensor")
        data = {
            "density": (group, ratio(sel, size), _attrs(
                "mask density", "fraction of the group's entries in the step's mask")),
            "selected": (group, np.where(exists, sel, np.nan).reshape(shape), _attrs(
                "selected entries", "entries of the group in the step's mask")),
            "fisher_mass": (group, ratio(ins, tot), _attrs(
                "Fisher mass captured",
                "sum of g^2 over the group's masked entries / sum of g^2 over the group, g = "
                "this step's mini-batch gradient before masking and clipping")),
            "jaccard_previous": (group, ratio(ip, up, has_prev), _attrs(
                "Jaccard index vs previous record",
                "|M and M_prev| / |M or M_prev| over the group's entries, M_prev the previously "
                "recorded mask")),
            "jaccard_first": (group, ratio(i_f, u_f), _attrs(
                "Jaccard index vs first record",
                "|M and M_first| / |M or M_first| over the group's entries")),
            "union_density": (group, ratio(uni, size), _attrs(
                "union density", "fraction of the group's entries selected at least once so far")),
            "total_density": ((), total_ratio(sel, size), _attrs("backbone mask density")),
            "total_selected": ((), float(sel.sum()), _attrs("selected backbone entries (k)")),
            "total_fisher_mass": ((), total_ratio(ins, tot), _attrs(
                "Fisher mass captured (backbone)")),
            "total_jaccard_previous": ((), total_ratio(ip, up, has_prev), _attrs(
                "Jaccard index vs previous record (backbone)")),
            "total_jaccard_first": ((), total_ratio(i_f, u_f), _attrs(
                "Jaccard index vs first record (backbone)")),
            "total_union_density": ((), total_ratio(uni, size), _attrs("union density (backbone)")),
            "group_size": (group, np.where(self.group_size > 0, self.group_size, np.nan), _attrs(
                "entries per group", "NaN: the block has no such tensor")),
        }
        coords: dict[str, Any] = {"block": list(self.blocks), "tensor": list(TENSOR_KINDS)}
        if self.matrices:
            n = self.image_size
            img = np.full((len(images), n, n), np.nan, dtype=np.float32)
            for j, im in enumerate(images):
                img[j, : im.shape[0], : im.shape[1]] = im
            data["mask_image"] = (("matrix", "row", "col"), img, _attrs(
                "pooled mask density",
                f"mean of the boolean mask over contiguous bins of rows x cols, at most {n} x {n} "
                "bins; smaller matrices keep their native size, padded with NaN"))
            shapes = [tuple(self.params[i].shape) for i, _ in self.matrices]
            per_matrix = {
                "matrix_rows": ([r for r, _ in shapes], "matrix rows (out features)"),
                "matrix_cols": ([c for _, c in shapes], "matrix columns (in features)"),
                "image_rows": ([im.shape[0] for im in images], "used image rows"),
                "image_cols": ([im.shape[1] for im in images], "used image columns"),
            }
            for name, (values, long_name) in per_matrix.items():
                data[name] = (("matrix",), np.array(values), _attrs(long_name))
            coords["matrix"] = [m for _, m in self.matrices]
            coords["row"], coords["col"] = np.arange(n), np.arange(n)
        ds = xr.Dataset({k: xr.Variable(*v) for k, v in data.items()}, coords=coords)
        ds["block"].attrs.update(
            long_name="backbone block",
            description="backbone block (stage and layer, index in the stage; execution order) "
            "or 'other'",
        )
        ds["tensor"].attrs.update(long_name="tensor kind")
        ds.attrs.update(
            title="Fisher-mask records",
            method=str(self.method.name),
            k=int(self.selection.k),
            eligible=int(self.selection.total),
            every=self.every,
            static_variables="group_size,matrix_rows,matrix_cols,image_rows,image_cols",
            step_description="0-based index of the optimiser step whose mask is recorded",
        )
        return ds

    # --- writing ----------------------------------------------------------------------------

    def on_step(self, step: int | None = None) -> None:
        """Write the records captured so far (call after ``opt.step()``)."""
        if not self._pending:
            return
        for s, ds in self._pending:
            self.store.append(s, ds)
        self._pending.clear()
        if self.mask_history > 0 and self._previous is not None:
            self._persist_masks()

    def _persist_masks(self) -> None:
        """Bit-packed first mask and the last ``mask_history`` recorded masks, for resuming."""
        masks_dir = self.store.path / FISHER_MASKS
        masks_dir.mkdir(parents=True, exist_ok=True)
        first = masks_dir / "first.npz"
        full = self.selection.collective.gather_full  # full masks on disk (any world size)
        spans = self.selection.spans
        if not first.exists() and self._first is not None:
            tmp = masks_dir / "first.tmp.npz"
            np.savez(tmp, bits=_pack(full(self._first, spans)), step=self._first_step)
            os.replace(tmp, first)
        path = masks_dir / f"step-{self._previous_step:08d}.npy"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, _pack(full(self._previous, spans)))
        os.replace(tmp, path)
        for old in sorted(masks_dir.glob("step-*.npy"))[: -self.mask_history]:
            old.unlink(missing_ok=True)

    def close(self, final_step: int | None = None) -> None:
        """Write what is pending and unwrap ``after_backward``."""
        self.on_step(final_step)
        self.remove()
